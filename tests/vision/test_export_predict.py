"""The self-describing model file and prediction on new images."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cassava_pipeline.vision.data import LoaderOptions
from cassava_pipeline.vision.export import (
    MODEL_FORMAT,
    ExportedModel,
    ExportError,
    export_checkpoint,
    load_exported,
    read_card,
)
from cassava_pipeline.vision.predict import Classifier, list_folder
from cassava_pipeline.vision.presize import PresizeJob, PresizeOptions, write_shards
from cassava_pipeline.vision.shards import ShardedImages
from cassava_pipeline.vision.tta import TtaOptions, predict
from tests.training import AUG, exported, initial_checkpoint


def test_round_trip_keeps_card_and_weights(tmp_path: Path):
    model = exported()
    path = tmp_path / "model.safetensors"
    path.write_bytes(model.to_bytes())
    net, card = load_exported(path)
    assert card == model.card
    assert card.classes == ("blue", "green", "red") and card.class_ids == ("0", "1", "2")
    assert (card.image_size, card.presize, card.arch) == (32, 40, "resnet18")
    assert card.augment["min_scale"] == 0.75 and "size" not in card.augment
    assert card.augment_options() == AUG
    assert card.stats.mean == (0.485, 0.456, 0.406)
    for k, v in net.state_dict().items():
        assert torch.equal(v, model.weights[k]), k
    assert not net.training


def test_file_is_safetensors_with_a_json_card(tmp_path: Path):
    data = exported().to_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["cassava_pipeline"])
    assert meta["format"] == MODEL_FORMAT
    assert meta["model_card"]["classes"] == ["blue", "green", "red"]
    assert data == exported().to_bytes()  # the same model saves to the same bytes
    assert b"\x80\x04" not in data[: 8 + n]  # no pickle protocol marker in the header


def test_loading_refuses_pickles_and_foreign_files(tmp_path: Path):
    pickled = pickle.dumps({"model": torch.zeros(2)})
    with pytest.raises(ExportError, match="not a safetensors file"):
        ExportedModel.from_bytes(pickled, source="evil.pt")
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    with pytest.raises(ExportError, match="not a safetensors file"):
        ExportedModel.from_bytes(buf.getvalue(), source="ckpt.pt")
    from safetensors.torch import save

    plain = save({"w": torch.zeros(2)})
    with pytest.raises(ExportError, match="expected 'cassava-pipeline/model-v2'"):
        read_card(plain, source="other.safetensors")


def test_export_checks_class_ids():
    ckpt = {**initial_checkpoint("resnet18"), "recipe_version": "test 1"}
    with pytest.raises(ExportError, match="2 class ids for 3 classes"):
        export_checkpoint(ckpt, class_ids=["0", "1"], augment=AUG, presize=40)


def test_list_folder_skips_hidden_files(test_images: Path):
    names = list_folder(test_images)
    assert ".DS_Store" not in names and len(names) == 9 and names == sorted(names)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_folder(test_images / "missing")


def test_predict_folder_reports_unreadable_files(test_images: Path):
    clf = Classifier(exported())
    names = list_folder(test_images)
    out = clf.predict([test_images / n for n in names], names=names, workers=2, chunk_size=4)
    assert out.names == ["0.jpg", "1.jpg", "2.jpg", "palette.png", "rgba.png"]
    reasons = dict(out.errors)
    assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "empty.jpg", "notes.txt"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("truncated image")
    assert reasons["notes.txt"].startswith("not an image")
    assert out.probabilities.shape == (5, 3)
    np.testing.assert_allclose(out.probabilities.sum(1), 1, atol=1e-5)
    table = out.table()
    assert list(table.columns[:4]) == ["image_id", "label", "class_name", "probability"]
    assert list(table.columns[4:]) == ["p_0", "p_1", "p_2"]
    assert table["label"].isin(["0", "1", "2"]).all()
    assert (table["class_name"] == [clf.classes[int(x)] for x in table["label"]]).all()


def test_plain_prediction_equals_the_validation_path(test_images: Path, tmp_path: Path):
    """In-memory prediction sees the pixels evaluation sees through the presized shards."""
    import pandas as pd

    model = exported()
    names = ["0.jpg", "1.jpg", "2.jpg", "palette.png", "rgba.png"]
    sizes = [Image.open(test_images / n).size for n in names]
    manifest = pd.DataFrame(
        {
            "path": names,
            "label": 0,
            "is_valid": True,
            "width": [s[0] for s in sizes],
            "height": [s[1] for s in sizes],
        }
    )
    job = PresizeJob(
        str(test_images), manifest, ("blue", "green", "red"), PresizeOptions(40, workers=1)
    )
    write_shards(job, tmp_path / "shards")
    shards = ShardedImages(tmp_path / "shards")
    loader = LoaderOptions(batch_size=2)
    ref, _ = predict(model.build(), shards, model.card.stats, AUG, loader, train_transforms=False)
    out = Classifier(model).predict([test_images / n for n in names], batch_size=2)
    assert torch.equal(torch.from_numpy(out.probabilities), ref)


def test_bytes_tta_and_chunks(test_images: Path):
    clf = Classifier(exported())
    paths = [test_images / f"{i}.jpg" for i in range(3)] + [test_images / "rgba.png"]
    plain = clf.predict(paths)
    from_bytes = clf.predict([p.read_bytes() for p in paths])
    np.testing.assert_array_equal(plain.probabilities, from_bytes.probabilities)
    chunked = clf.predict(paths, chunk_size=3)  # other batch shapes: equal up to float rounding
    np.testing.assert_allclose(plain.probabilities, chunked.probabilities, atol=1e-6)
    assert from_bytes.names[0] == "<bytes #0>"
    options = TtaOptions(n=2)
    with_tta = clf.predict(paths, tta_options=options)
    again = clf.predict(paths, tta_options=options)
    np.testing.assert_array_equal(with_tta.probabilities, again.probabilities)  # seeded
    assert not np.allclose(with_tta.probabilities, plain.probabilities, atol=1e-6)
    empty = clf.predict([])
    assert empty.probabilities.shape == (0, 3) and empty.table().empty


def _member(seed: int, class_ids=("0", "1", "2")):
    ckpt = {**initial_checkpoint("resnet18", seed=seed), "recipe_version": "t", "stage": "mixup"}
    return export_checkpoint(ckpt, class_ids=list(class_ids), augment=AUG, presize=40)


def test_a_fold_ensemble_averages_its_members_probabilities(test_images: Path):
    from cassava_pipeline.vision.predict import Ensemble

    names = list_folder(test_images)
    paths = [test_images / n for n in names]
    members = [_member(1), _member(2), _member(3)]
    tta_options = TtaOptions(n=2)
    each = [Classifier(m).predict(paths, tta_options=tta_options, batch_size=3) for m in members]
    together = Ensemble(members).predict(paths, tta_options=tta_options, batch_size=3)
    assert together.names == each[0].names and together.errors == each[0].errors
    mean = np.mean([p.probabilities for p in each], axis=0)
    np.testing.assert_allclose(together.probabilities, mean, rtol=0, atol=1e-6)
    assert not np.allclose(each[0].probabilities, each[1].probabilities)  # different members
    with pytest.raises(ValueError, match="differ in class_ids"):
        Ensemble([members[0], _member(4, class_ids=("a", "b", "c"))])


def test_an_exported_ensemble_is_one_verified_file_that_predicts_as_its_members(
    test_images: Path, tmp_path: Path
):
    from cassava_pipeline.datasets import ExportedModelDataset
    from cassava_pipeline.vision.export import ENSEMBLE_FORMAT, ExportedEnsemble, load_model_file
    from cassava_pipeline.vision.predict import Ensemble, classifier

    members = (_member(1), _member(2))
    data = ExportedEnsemble(members).to_bytes()
    assert data == ExportedEnsemble((_member(1), _member(2))).to_bytes()  # same models, bytes
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["cassava_pipeline"])
    assert header["format"] == ENSEMBLE_FORMAT and len(header["members"]) == 2
    back = load_model_file(data, source="cv_ensemble.safetensors")
    assert isinstance(back, ExportedEnsemble) and len(back.members) == 2
    for was, now in zip(members, back.members, strict=True):
        assert now.card == was.card and now.weights.keys() == was.weights.keys()
        assert all(torch.equal(now.weights[k], w) for k, w in was.weights.items())
    assert isinstance(load_model_file(members[0].to_bytes()), ExportedModel)  # one model: itself

    # through the catalog's dataset: the file predicts as the ensemble of its members
    dataset = ExportedModelDataset(path=str(tmp_path / "cv_ensemble.safetensors"))
    dataset.save(back)
    loaded = dataset.load()
    paths = [test_images / n for n in list_folder(test_images)]
    predictor = classifier(loaded)
    assert isinstance(predictor, Ensemble)
    got = predictor.predict(paths, tta_options=None, batch_size=3).probabilities
    want = Ensemble(list(members)).predict(paths, tta_options=None, batch_size=3).probabilities
    np.testing.assert_array_equal(got, want)

    # a damaged member is refused, named; so is a single-model reader, and members that differ
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF  # inside the last member's last tensor
    with pytest.raises(ExportError, match=r"member 1\) is damaged"):
        load_model_file(bytes(damaged), source="cv_ensemble.safetensors")
    with pytest.raises(ExportError, match="expected 'cassava-pipeline/model-v2'"):
        ExportedModel.from_bytes(data, source="cv_ensemble.safetensors")
    with pytest.raises(ExportError, match="differ in class_ids"):
        ExportedEnsemble((members[0], _member(4, class_ids=("a", "b", "c"))))
    with pytest.raises(ExportError, match="at least one"):
        ExportedEnsemble(())
