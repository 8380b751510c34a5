"""Synthetic chest-CT phantoms written in LUNA16's exact on-disk layout.

A phantom is an anatomical model, not a texture: body wall (skin, fat, muscle), ribs, spine,
sternum, heart and great vessels, two lungs with textured parenchyma, space-filling vessel
trees that taper from the hilum (the hard negatives: a vessel cut across looks like a nodule),
airways, a scanner table and correlated scanner noise.  Nodules of four kinds and three
locations are placed inside the lungs, with the diameters of LUNA16's annotated nodules, and
reported in LUNA16's CSV formats; their exact voxels are also written as a mask
(``masks/<uid>.mha``, the layout ``lunaseg import-lidc`` uses for reader outlines), so
``prepcache --masks outline`` can train on true shapes and show what the book's HU
heuristic costs.  ``phantom_nodules.csv`` adds each nodule's kind, location and shape to
the annotation columns, so misses can be broken down by them.

Everything is sized relative to the body, and the body relative to the field of view, so a
small (32, 128, 128) volume still shows a whole chest, only at a coarser resolution.  Nodule
diameters stay in millimetres.  Randomness comes only from the ``numpy.random.Generator``
passed in, so a seed reproduces every byte.

One module per concept, each importing only those before it: ``tubes`` (line segments with
radii, their rasteriser, tree growth), ``anatomy`` (organs as closed-form tests, the coarse
lung mask), ``vessels`` (one patient's vessel and airway trees), ``nodules`` (sizes, kinds,
placement, ratings), ``render`` (the image slab by slab: maps, bones, blur, noise),
``phantom`` (``make_phantom``) and ``dataset`` (``synthesize_dataset``).  A leading
underscore marks a name private to this package, not to its module.
"""

from lunaseg.synth.dataset import (PHANTOM_NODULE_COLUMNS, PHANTOM_NODULES_FILE, PHANTOM_VERSION,
                                   SynthSummary, synthesize_dataset)
from lunaseg.synth.nodules import MIN_DIAMETER_MM, NODULE_KINDS, NODULE_LOCATIONS, SynthNodule
from lunaseg.synth.phantom import Phantom, make_phantom, make_series_uid

# Not the API (not in __all__), but importable from here: the tests use them.
from lunaseg.synth.nodules import CALCIFIED_MAX_MM, KIND_SHARES, SUBSOLID_MIN_MM  # noqa: F401
from lunaseg.synth.nodules import kind_weights, luna16_diameter_mm  # noqa: F401
from lunaseg.synth.phantom import UID_PREFIX  # noqa: F401
from lunaseg.synth.tubes import _Tubes  # noqa: F401

__all__ = [
    "SynthNodule", "Phantom", "SynthSummary", "make_phantom", "synthesize_dataset",
    "make_series_uid", "NODULE_KINDS", "NODULE_LOCATIONS", "MIN_DIAMETER_MM",
    "PHANTOM_NODULE_COLUMNS", "PHANTOM_NODULES_FILE", "PHANTOM_VERSION",
]
