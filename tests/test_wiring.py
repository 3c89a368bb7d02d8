"""How each method wires views, partner, lambda and the BSIM weight into its loss (docs/METHOD.md).

The networks are replaced by fixed linear maps of the pixels, so every view has a known output; the expected
losses are then written out here, sample by sample in float64, from the paper's equations (SimCLR eqs. 1-2,
MoCo eq. 3, BYOL eq. 4, SimSiam "eq. 4 with scale 0.5"), without calling `bsim_fast.losses`. What the setup
makes visible: the partner is a 5-cycle (not its own inverse), lambda differs per sample and between the two
view sets (lam_a != lam_b), the WBSIM weight is not 1, and the four views are unrelated tensors, so a mixed view
routed against its own view set's targets, a swapped lam_a / lam_b or an ignored weight changes the loss.
"""

import math

import pytest
import torch

from bsim_fast.config import Config
from bsim_fast.methods import build_method

N, SIDE, DIM = 5, 4, 6  # images per batch, view side, output width
PARTNER = [2, 0, 4, 1, 3]  # one cycle 0 -> 2 -> 4 -> 3 -> 1 -> 0; its inverse is [1, 3, 0, 4, 2]
LAM_A = [0.9, 0.3, 0.55, 0.7, 0.15]  # lambda' of the mixed views m' (what stays of image i)
LAM_B = [0.2, 0.85, 0.6, 0.45, 0.35]  # lambda'' of m''
WEIGHT = 0.37  # w of WBSIM
TAU = 0.3  # SimCLR's and MoCo's temperature
QUEUE = 7  # MoCo's queue length


def views():
    g = torch.Generator().manual_seed(0)
    names = ("plain_a", "plain_b", "mixed_a", "mixed_b")
    out = {k: torch.randn(N, 3, SIDE, SIDE, generator=g) for k in names}
    out.update(partner=torch.tensor(PARTNER), lam_a=torch.tensor(LAM_A), lam_b=torch.tensor(LAM_B))
    return out


def linear_maps(*names):
    """One fixed random map from the pixels of a view to DIM outputs per name (seeded by the name)."""
    maps = {}
    for name in names:
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        maps[name] = torch.randn(3 * SIDE * SIDE, DIM, generator=g) / SIDE
    return maps


def apply(matrix, x):
    return x.flatten(1).float() @ matrix


def method_with_fixed_networks(name, mode, **settings):
    """The method with its networks replaced by fixed linear maps; the maps and the queue are returned too."""
    cfg = Config()
    cfg.method.name, cfg.method.mode = name, mode
    cfg.bsim.weight = WEIGHT
    cfg.model.arch, cfg.model.cifar_stem = "resnet18", True
    cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden, cfg.model.queue_size = 8, DIM, 8, QUEUE
    for key, value in settings.items():
        setattr(cfg.method.settings, key, value)
    method = build_method(cfg)
    if name in ("byol", "simsiam"):
        maps = linear_maps("prediction", "projection", "target")
        method.encode = lambda x: (apply(maps["prediction"], x), apply(maps["projection"], x))
        # BYOL's target is its own (EMA) network; SimSiam's is the online projector itself
        method.encode_target = lambda x: apply(maps["target" if name == "byol" else "projection"], x)
    elif name == "moco":
        maps = linear_maps("query", "key")
        method.encode = lambda x: (apply(maps["query"], x), apply(maps["query"], x))
        method.key_forward = lambda x: apply(maps["key"], x)
        g = torch.Generator().manual_seed(1)
        method.queue.copy_(torch.nn.functional.normalize(torch.randn(QUEUE, DIM, generator=g), dim=1))
    else:
        maps = linear_maps("projection")
        method.encode = lambda x: apply(maps["projection"], x)
    return method, maps


# ---------------------------------------------------------------- the paper's equations, one sample at a time


class Mixing:
    """What the expected losses read besides the outputs: the partner and lambda of each view set."""

    def __init__(self, partner=PARTNER, lam_a=LAM_A, lam_b=LAM_B):
        self.partner, self.lam_a, self.lam_b = partner, lam_a, lam_b


def rows(x):
    return [[float(v) for v in row] for row in x.double()]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True))


def cos(u, v):
    return dot(u, v) / math.sqrt(dot(u, u) * dot(v, v))


def pairwise(online, targets, term, lam=None, partner=None):
    """mean_i [lam_i term(q_i, t_i) + (1 - lam_i) term(q_i, t_partner(i))]; lam None: SIM, term(q_i, t_i)."""
    total = 0.0
    for i in range(N):
        if lam is None:
            total += term(online[i], targets[i])
        else:
            total += lam[i] * term(online[i], targets[i]) + (1 - lam[i]) * term(online[i], targets[partner[i]])
    return total / N


def two_directions(online, targets, term, mix):
    """(SIM, BSIM) summed over the two directions: a against b's targets, b against a's; m' against b's
    targets with lambda', m'' against a's with lambda''."""
    sim = pairwise(online["plain_a"], targets["plain_b"], term) + pairwise(online["plain_b"], targets["plain_a"], term)
    bsim = pairwise(online["mixed_a"], targets["plain_b"], term, mix.lam_a, mix.partner)
    bsim += pairwise(online["mixed_b"], targets["plain_a"], term, mix.lam_b, mix.partner)
    return sim, bsim


def byol_expected(out, mix, queue=None):
    """BYOL eq. 4: l(q, z) = 2 - 2 cos(q, z) against the target network's projections; directions summed."""
    return two_directions(out["prediction"], out["target"], lambda q, z: 2 - 2 * cos(q, z), mix)


def simsiam_expected(out, mix, queue=None):
    """SimSiam: D(p, z) = -cos(p, z) against the plain views' own projections, 0.5 per direction."""
    sim, bsim = two_directions(out["prediction"], out["projection"], lambda p, z: -cos(p, z), mix)
    return 0.5 * sim, 0.5 * bsim


def moco_expected(out, mix, queue):
    """MoCo eq. 3 with the positive in its own denominator (InfoNCE), queries and keys normalised; symmetric:
    the mean of the two directions (solo-learn's MoCo v2+)."""

    def unit(v):
        norm = math.sqrt(dot(v, v))
        return [a / norm for a in v]

    negatives = [unit(n) for n in rows(queue)]

    def nce(q, k):
        q, k = unit(q), unit(k)
        positive = math.exp(dot(q, k) / TAU)
        return -math.log(positive / (positive + sum(math.exp(dot(q, n) / TAU) for n in negatives)))

    sim, bsim = two_directions(out["query"], out["key"], nce, mix)
    return sim / 2, bsim / 2


def simclr_expected(out, mix, queue=None):
    """SimCLR eqs. 1-2. Anchor m'_i (lambda'_i of image i, the rest of j = partner(i)): positives z''_i and
    z''_j with weights lambda and 1 - lambda over one denominator that holds every z''_k and the z'_k with k
    not in {i, j} (the indicator); m''_i the same with ' and '' exchanged; the mean over the 2N anchors.
    SIM is NT-Xent: anchor a_i, positive b_i, the other 2N - 2 views negatives; the same for b_i."""
    z = out["projection"]

    def s(u, v):
        return math.exp(cos(u, v) / TAU)

    def anchor_loss(anchor, other_set, same_set, i, j, lam):
        denominator = sum(s(anchor, v) for v in other_set)
        denominator += sum(s(anchor, same_set[k]) for k in range(N) if k not in (i, j))
        loss = -lam * math.log(s(anchor, other_set[i]) / denominator)
        return loss - (1 - lam) * math.log(s(anchor, other_set[j]) / denominator)

    a, b = z["plain_a"], z["plain_b"]
    sim = sum(anchor_loss(a[i], b, a, i, i, 1.0) + anchor_loss(b[i], a, b, i, i, 1.0) for i in range(N))
    bsim = 0.0
    for i in range(N):
        j = mix.partner[i]
        bsim += anchor_loss(z["mixed_a"][i], b, a, i, j, mix.lam_a[i])
        bsim += anchor_loss(z["mixed_b"][i], a, b, i, j, mix.lam_b[i])
    return sim / (2 * N), bsim / (2 * N)


EXPECTED = {"byol": byol_expected, "simsiam": simsiam_expected, "moco": moco_expected, "simclr": simclr_expected}
CASES = [
    ("byol", {}),
    ("simsiam", {}),
    ("simclr", {"temperature": TAU}),
    ("moco", {"symmetric": True, "temperature": TAU}),
]


def fixed_outputs(maps, batch):
    """Every map applied to every view: out[map][view] = N rows of floats."""
    names = ("plain_a", "plain_b", "mixed_a", "mixed_b")
    return {m: {v: rows(apply(matrix, batch[v])) for v in names} for m, matrix in maps.items()}


@pytest.mark.parametrize("mode", ["sim", "bsim", "wbsim"])
@pytest.mark.parametrize("name,settings", CASES, ids=[c[0] for c in CASES])
def test_loss_from_fixed_outputs_equals_the_papers_equations(name, settings, mode):
    batch = views()
    method, maps = method_with_fixed_networks(name, mode, **settings)
    sim, bsim = EXPECTED[name](fixed_outputs(maps, batch), Mixing(), method.queue.clone() if name == "moco" else None)
    got = method(**batch)
    expected = {"sim": sim, "bsim": bsim, "wbsim": sim + WEIGHT * bsim}[mode]
    assert got["loss"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ("loss_sim" in got) == (mode != "bsim") and ("loss_bsim" in got) == (mode != "sim")
    if mode != "bsim":
        assert got["loss_sim"].item() == pytest.approx(sim, rel=1e-5, abs=1e-6)
    if mode != "sim":
        assert got["loss_bsim"].item() == pytest.approx(bsim, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,settings", CASES, ids=[c[0] for c in CASES])
def test_the_setup_tells_the_wirings_apart(name, settings):
    """The expected BSIM loss moves when lam_a and lam_b are exchanged, when the partner is inverted, and when
    each mixed view meets its own view set's targets (a and b exchanged on the target side): so the comparison
    above sees each of these bugs, whatever the constants are changed to."""
    batch = views()
    method, maps = method_with_fixed_networks(name, "bsim", **settings)
    out = fixed_outputs(maps, batch)
    queue = method.queue.clone() if name == "moco" else None
    right = EXPECTED[name](out, Mixing(), queue)[1]
    own_set = {m: {**v, "plain_a": v["plain_b"], "plain_b": v["plain_a"]} for m, v in out.items()}
    wrong = {
        "lam_a and lam_b exchanged": EXPECTED[name](out, Mixing(lam_a=LAM_B, lam_b=LAM_A), queue)[1],
        "partner inverted": EXPECTED[name](out, Mixing(partner=[PARTNER.index(i) for i in range(N)]), queue)[1],
        "own view set's targets": EXPECTED[name](own_set, Mixing(), queue)[1],
    }
    assert all(abs(w - right) > 1e-3 for w in wrong.values()), (right, wrong)
