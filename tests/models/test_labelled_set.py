"""efficientnet-lite0's labelled evaluation set: real photos from installed packages, each with the
ImageNet classes a person accepts for it; disjoint from the calibration photos."""

from __future__ import annotations

import os

import numpy as np
import pytest

from optiserve.models.efficientnet_lite0 import preprocess
from optiserve.models.images import LABELLED_ELSEWHERE, calibration_photos, crops, photo_names
from optiserve.models.labelled import CROPS_PER_PHOTO, catalogue, labelled_set
from optiserve.models.resolve import dataset, resolve_model, targets


def test_the_catalogue_is_well_formed() -> None:
    photos = catalogue()
    assert len({p.id for p in photos}) == len(photos)
    assert all(p.classes and all(0 <= c < 1000 for c in p.classes) for p in photos)
    assert all((p.loader is None) != (p.path is None) for p in photos)
    assert len({p.classes[0] for p in photos}) >= 8


def test_every_photo_is_installed_in_ci() -> None:
    found = labelled_set()
    if found.missing_packages:
        message = (
            f"labelled photos missing: {', '.join(found.missing_packages)} (make system-deps installs them)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert found.n_photos == len(catalogue())
    assert len(found.crops) == CROPS_PER_PHOTO * found.n_photos


def test_eval_data_and_targets_line_up() -> None:
    spec = resolve_model("efficientnet-lite0")
    n = min(50, len(labelled_set().crops))
    x, description = dataset(spec, "eval", n)
    y = targets(spec, "eval", n)
    assert y is not None and len(y) == len(x) == n
    assert "labelled crops" in description and description.startswith(f"{n} ")
    # the first crops cover distinct photos (round robin), so a small n still spans many classes
    assert len(set(labelled_set().photo_ids[:n])) == min(n, labelled_set().n_photos)


def test_calibration_never_sees_a_labelled_photo() -> None:
    names = photo_names()
    used = {names[i] for i in calibration_photos()}
    assert not used & set(LABELLED_ELSEWHERE)
    spec = resolve_model("efficientnet-lite0")
    calib, _ = dataset(spec, "calibration", 40)
    restricted = np.stack([preprocess(c) for c in crops("calibration", 40, photos=calibration_photos())])
    unrestricted = np.stack([preprocess(c) for c in crops("calibration", 40)])
    np.testing.assert_array_equal(calib, restricted)  # the model's calibration split is the restricted one
    assert not np.array_equal(calib, unrestricted), "the restriction would change nothing: a vacuous test"
