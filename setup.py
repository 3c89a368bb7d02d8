"""The packages, which setup.cfg cannot list (found ones plus a mapped folder): bsim_fast and its sub-packages,
data_prep (the converters), and configs/ shipped as bsim_fast.configs (with configs/small, configs/_base) without
moving the folder, so that an installed package finds its recipes by name. Everything else is in setup.cfg."""

from setuptools import find_namespace_packages, setup

# namespace discovery: folders without .py files (bsim_fast/data: the built-in set; the recipe folders) are
# packages of their own, which is how their files are shipped
recipes = ["bsim_fast.configs", *(f"bsim_fast.configs.{name}" for name in find_namespace_packages(where="configs"))]
setup(
    packages=[
        *find_namespace_packages(include=["bsim_fast", "bsim_fast.*", "data_prep"], exclude=["*.__pycache__"]),
        *recipes,
    ],
    package_dir={"bsim_fast.configs": "configs"},
)
