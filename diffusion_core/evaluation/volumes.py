"""Shape statistics of volumes: occupancy, fill ratio, topology and their distributions against
held-out volumes, per class. FID, KID and precision/recall of volumes go through the same path as
images' (``diffusion_core.evaluation.fidelity``, on the judge's 3-D features)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import wasserstein_distance
from torch import Tensor

from diffusion_core.data.dataset import ImageDataset
from diffusion_core.data.volumes import OCCUPIED
from diffusion_core.evaluation.judge import TrainedClassifier


def occupancy(volumes: Tensor) -> Tensor:
    """Fraction of voxels above 0.5 of full scale, per volume: (N, C, D, H, W) uint8 -> (N,)."""
    return (volumes > OCCUPIED).flatten(1).double().mean(1)


def fill_ratio(volumes: Tensor) -> Tensor:
    """Occupied voxels over the volume of their bounding box, per volume (0 when empty).

    A compactness statistic that tells the classes apart: 1 for a box, pi/6 for a sphere and
    pi^2 R r / (4 (R + r)^2) for a torus of radii R > r (each up to the voxel grid).
    """
    occupied = (volumes > OCCUPIED).any(dim=1)  # (N, D, H, W)
    out = torch.zeros(len(volumes), dtype=torch.float64)
    for i, mask in enumerate(occupied):
        count = int(mask.sum())
        if count == 0:
            continue
        box = 1
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            hit = mask.any(dim=other).nonzero()
            box *= int(hit.max() - hit.min() + 1)
        out[i] = count / box
    return out


def euler_characteristic(volumes: Tensor) -> Tensor:
    """Euler characteristic of the occupied voxels taken as closed unit cubes, per volume:
    vertices - edges + faces - cubes of their union, (N, C, D, H, W) uint8 -> (N,) long.

    It is components - tunnels + cavities: 1 for a solid ball or box (and a ring broken open), 0
    for a solid torus, 2 for two separate solids or a hollow shell. A lattice
    element belongs to the union when one of the voxels around it is occupied: a max over the
    2-wide windows along the axes the element is a point of."""
    occ = F.pad((volumes > OCCUPIED).any(dim=1).float(), (1, 1, 1, 1, 1, 1)).unsqueeze(1)

    def touched(kernel: tuple[int, int, int]) -> Tensor:
        return F.max_pool3d(occ, kernel, stride=1).flatten(1).sum(1)

    vertices = touched((2, 2, 2))
    edges = touched((1, 2, 2)) + touched((2, 1, 2)) + touched((2, 2, 1))
    faces = touched((2, 1, 1)) + touched((1, 2, 1)) + touched((1, 1, 2))
    cubes = occ.flatten(1).sum(1)
    return (vertices - edges + faces - cubes).round().long()


_TOUCHING = np.ones((3, 3, 3), dtype=bool)  # voxels sharing a face, an edge or a corner


def components(volumes: Tensor) -> Tensor:
    """Connected pieces of occupied voxels (26-connected, as the closed cubes of
    :func:`euler_characteristic` touch), per volume: (N, C, D, H, W) uint8 -> (N,) long."""
    occupied = (volumes > OCCUPIED).any(dim=1).numpy()
    return torch.tensor([ndimage.label(m, structure=_TOUCHING)[1] for m in occupied])


def topology(volumes: Tensor) -> list[tuple[int, int]]:
    """(components, Euler characteristic) of each volume: (1, 1) for a ball or box, (1, 0) for a
    solid torus, (2, 2) for two pieces, (0, 0) for an empty volume."""
    return list(
        zip(components(volumes).tolist(), euler_characteristic(volumes).tolist(), strict=True)
    )


def wasserstein_1d(a: Tensor, b: Tensor) -> float:
    """Earth mover's distance between two 1-D empirical distributions (scipy)."""
    return float(wasserstein_distance(a.double().numpy(), b.double().numpy()))


def _halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint random halves of range(n) of equal size."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half], perm[half : 2 * half]


def volume_statistics(
    gen: Tensor, labels: Tensor | None, holdout: ImageDataset, judge: TrainedClassifier
) -> dict[str, float]:
    """Shape statistics of generated volumes against held-out ones: occupancy (its distribution's
    Wasserstein distance with a holdout-vs-holdout floor) and, per class when labelled, the
    occupancy and fill ratio of generated (by requested class) and held-out volumes, the share of
    each with the class's usual topology (the most common (components, Euler characteristic) of
    its held-out volumes: a torus is one piece with one tunnel, a ring broken open or a box split
    in two is not) and the judge's accuracy on the generated ones."""
    occ_gen, occ_ref = occupancy(gen), occupancy(holdout.images)
    first, second = _halves(len(occ_ref))
    out: dict[str, float] = {
        "occupancy_generated": float(occ_gen.mean()),
        "occupancy_holdout": float(occ_ref.mean()),
        "occupancy_w1": wasserstein_1d(occ_gen, occ_ref),
        "occupancy_w1_half": wasserstein_1d(occ_gen[: len(first)], occ_ref[first]),
        "occupancy_w1_floor_half": wasserstein_1d(occ_ref[second], occ_ref[first]),
    }
    if labels is None:
        return out
    predicted = judge.predict(gen)
    fill_gen, fill_ref = fill_ratio(gen), fill_ratio(holdout.images)
    topo_gen, topo_ref = topology(gen), topology(holdout.images)
    real_labels = holdout.labels
    for k, name in enumerate(holdout.class_names):
        mine = labels == k
        if not mine.any():
            continue
        out[f"accuracy/{name}"] = float((predicted[mine] == k).double().mean())
        out[f"occupancy/{name}/generated"] = float(occ_gen[mine].mean())
        out[f"fill_ratio/{name}/generated"] = float(fill_gen[mine].mean())
        real = real_labels == k if real_labels is not None else None
        if real is not None and real.any():
            out[f"occupancy/{name}/holdout"] = float(occ_ref[real].mean())
            out[f"fill_ratio/{name}/holdout"] = float(fill_ref[real].mean())
            # The class's usual topology among held-out volumes, and how often each side has it.
            ref = [topo_ref[i] for i in real.nonzero().flatten().tolist()]
            usual, count = Counter(ref).most_common(1)[0]
            gen_k = [topo_gen[i] for i in mine.nonzero().flatten().tolist()]
            out[f"topology/{name}/generated"] = sum(t == usual for t in gen_k) / len(gen_k)
            out[f"topology/{name}/holdout"] = count / len(ref)
    return out
