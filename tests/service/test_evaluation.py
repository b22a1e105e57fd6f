"""``dino retrieval`` and ``dino copydetect`` (service.evaluation): the metrics against hand
computations, the copy generator, and both commands end to end on tiny folders of real photos
(ImageNet sample photos and Imagenette), through the service's gallery."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino.data_dir import data_dir
from dino.images import decode_image
from service.evaluation import copydetect, retrieval
from service.evaluation.copies import EDIT_KINDS, OPTIONAL_GROUPS, plan_copy, render_copy
from service.evaluation.features import Whitening, gem_pool, parse_ks
from service.evaluation.metrics import average_precision, hit_at_k, micro_average_precision, precision_at_k
from service.settings import REPO_ROOT
from tests.service.images import photo, photo_paths

SHIPPED_MODEL = REPO_ROOT / "models" / "dino-vit-tiny8-imagenette-cpu"


def run_command(module, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command module as ``dino NAME`` would (its parser, its main); (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    code = module.main(parser.parse_args([*argv, "--no-progress", "--threads", "2"]))
    out = capsys.readouterr()
    return code, out.out, out.err


def imagenette(split: str = "train") -> Path:
    folder = data_dir() / "imagenette" / split
    if not folder.is_dir():
        pytest.skip(f"Imagenette not found in {folder} (set DINO_DATA_DIR to the shared data folder)")
    return folder


def labelled_folder(target: Path, split: str, classes: int, per_class: int, offset: int = 0) -> Path:
    """A tiny ImageFolder: ``per_class`` Imagenette images of each of the first ``classes`` classes."""
    source = imagenette(split)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        (target / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.glob("*.JPEG"))[offset : offset + per_class]:
            shutil.copy(path, target / class_dir.name / path.name)
    return target


# --------------------------------------------------------------------------------------------------
# metrics, by hand
# --------------------------------------------------------------------------------------------------


def test_average_precision_matches_a_hand_computation():
    ranking = [True, False, True, False, False, True]  # relevant at ranks 1, 3 and 6
    # precision at those ranks: 1/1, 2/3, 3/6
    assert average_precision(ranking) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # a fourth relevant image that the list does not hold counts as never found
    assert average_precision(ranking, n_relevant=4) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    assert average_precision([False, True]) == pytest.approx(0.5)
    assert average_precision([True] * 3 + [False] * 5) == 1.0
    with pytest.raises(ValueError):
        average_precision([False, False])
    assert precision_at_k(ranking, 1) == 1.0
    assert precision_at_k(ranking, 5) == pytest.approx(2 / 5)
    assert precision_at_k([True], 10) == pytest.approx(1 / 10)  # a short list's missing ranks are misses
    assert hit_at_k([False, False, True], 2) is False
    assert hit_at_k([False, False, True], 3) is True


def test_retrieval_metrics_average_over_queries():
    relevance = [np.array([True, False, True]), np.array([False, True, False])]
    result = retrieval.retrieval_metrics(relevance, [2, 1], [1, 2])
    assert result["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert result["recall_at_k"] == {"1": 0.5, "2": 1.0}
    assert result["precision_at_k"] == {"1": 0.5, "2": 0.5}


def test_micro_average_precision_pools_all_queries_pairs():
    # query A finds its original first (0.9); query B ranks a distractor (0.95) above its original (0.3)
    scores = [0.9, 0.95, 0.3]
    positive = [True, False, True]
    # pooled by score: 0.95 (no), 0.9 (yes), 0.3 (yes): precision 1/2 and 2/3 at the true pairs
    assert micro_average_precision(scores, positive, 2) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # the mean of per-query APs is higher: the distractor's score only hurts query B
    assert (average_precision([True]) + average_precision([False, True])) / 2 == pytest.approx(0.75)
    # a copy whose original is not in any list lowers recall
    assert micro_average_precision(scores, positive, 3) == pytest.approx((1 / 2 + 2 / 3) / 3)
    # ties: non-matches first (a constant score earns nothing)
    assert micro_average_precision([0.5, 0.5], [True, False], 1) == pytest.approx(0.5)


def test_gem_pooling_and_whitening():
    tokens = np.array([[[1.0, -2.0], [3.0, -1.0]]], dtype=np.float32)  # [B=1, N=2, D=2]
    assert gem_pool(tokens, p=1) == pytest.approx(np.array([[2.0, 1e-6]]), abs=1e-6)  # negatives clamped
    assert gem_pool(tokens, p=4)[0, 0] == pytest.approx(((1 + 81) / 2) ** 0.25, rel=1e-5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 4)) * np.array([10.0, 3.0, 1.0, 0.1]) + 5.0
    whitening = Whitening.fit(x)
    projected = (x - whitening.mean) @ whitening.projection.T
    assert np.cov(projected.T, bias=True) == pytest.approx(np.eye(4), abs=1e-3)
    assert np.linalg.norm(whitening(x[:5]), axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    assert Whitening.fit(x[:3]).dim == 2  # 3 images span 2 directions: the others are not amplified


def test_parse_ks():
    assert parse_ks("10,1,5,1") == [1, 5, 10]
    with pytest.raises(Exception, match="positive integers"):
        parse_ks("0,5")


# --------------------------------------------------------------------------------------------------
# the copy generator
# --------------------------------------------------------------------------------------------------


def test_copies_are_deterministic_and_each_edit_kind_gives_a_valid_image():
    original = photo(3)
    donors = [photo(10), photo(11)]
    plan = plan_copy("a/b.JPEG", 1, seed=7, donors=2)
    again = plan_copy("a/b.JPEG", 1, seed=7, donors=2)
    assert plan == again and render_copy(original, plan, donors) == render_copy(original, again, donors)
    assert plan_copy("a/b.JPEG", 1, seed=8, donors=2) != plan
    assert plan_copy("a/b.JPEG", 2, seed=7, donors=2) != plan
    plain = np.asarray(original.resize((64, 64)), dtype=np.float32)
    for kind in EDIT_KINDS:
        data = render_copy(original, plan_copy("x", 0, donors=2, kinds=[kind]), donors)
        img = decode_image(data, 10**8)  # the service's decoder accepts it
        assert img.mode == "RGB" and min(img.size) > 16, kind
        difference = np.abs(np.asarray(img.resize((64, 64)), dtype=np.float32) - plain).mean()
        assert difference > 1.0, f"{kind} left the image unchanged"
    with pytest.raises(ValueError, match="donor"):
        plan_copy("x", 0, kinds=["patch"])
    with pytest.raises(ValueError, match="unknown edit"):
        plan_copy("x", 0, kinds=["sepia"])


def test_random_plans_combine_strong_edits():
    plans = [plan_copy(f"img{i}.jpg", c, seed=0, donors=4) for i in range(40) for c in range(3)]
    seen = {kind for plan in plans for kind in plan.kinds}
    assert seen == set(EDIT_KINDS)
    for plan in plans:
        assert {"crop", "jpeg"} <= set(plan.kinds)
        optional = [group for group in OPTIONAL_GROUPS if set(group) & set(plan.kinds)]
        assert 2 <= len(optional) <= 4
        crop = plan.edits[0].params
        assert 0.3 <= crop["area"] <= 0.8
        jpeg = plan.edits[-1].params
        assert 10 <= jpeg["quality"] <= 30
    assert all("patch" not in plan_copy(f"i{i}", 0, donors=0).kinds for i in range(40))


# --------------------------------------------------------------------------------------------------
# dino retrieval
# --------------------------------------------------------------------------------------------------


def test_retrieval_end_to_end(model_dir, tmp_path, capsys):
    database = labelled_folder(tmp_path / "db", "train", classes=3, per_class=4)
    queries = labelled_folder(tmp_path / "q", "val", classes=3, per_class=2)
    (database / sorted(p.name for p in database.iterdir())[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    output = tmp_path / "result.json"
    code, out, err = run_command(
        retrieval,
        ["--model", str(model_dir), "--database", str(database), "--queries", str(queries), "--output", str(output)],
        capsys,
    )
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["database"] == {
        "folder": str(database),
        "images": 13,
        "embedded": 12,
        "skipped": 1,
        "classes": 3,
    }
    assert result["queries"]["embedded"] == 6 and result["ranking_depth"] == 12
    assert result["gallery"] == {
        "backend": "faiss",
        "index_type": "flat",
        "dim": 192,
        "size": 12,
        "model": "test-vit-tiny8",
    }
    assert result["skipped_files"][0]["item"].endswith("broken.jpg")
    assert 0 < result["map"] <= 1 and set(result["map_per_class"]) == {p.name for p in database.iterdir()}
    recall = [result["recall_at_k"][k] for k in ("1", "5", "10")]
    assert recall == sorted(recall) and result["recall_at_k"]["1"] == result["precision_at_k"]["1"]
    assert "mAP" in out

    # the same numbers from a brute-force ranking of the same features (the gallery's search is exact)
    from service.evaluation.features import embed_files, load_settings, make_features

    features = make_features(load_settings(str(model_dir), "cpu", None))
    db_files, db_labels = retrieval.labelled_files(database, "database")
    q_files, q_labels = retrieval.labelled_files(queries, "queries")
    db = embed_files(features, db_files, database, progress=False)
    q = embed_files(features, q_files, queries, progress=False)
    kept_labels = np.array([db_labels[i] for i in db.kept])
    order = np.argsort(-(q.features @ db.features.T), axis=1, kind="stable")
    relevance = [kept_labels[row] == q_labels[i] for i, row in zip(q.kept, order, strict=True)]
    expected = retrieval.retrieval_metrics(relevance, [int((kept_labels == q_labels[i]).sum()) for i in q.kept], [1])
    assert result["map"] == pytest.approx(expected["map"], abs=1e-6)


def test_retrieval_pixels_baseline_needs_no_model(tmp_path, capsys):
    database = labelled_folder(tmp_path / "db", "train", classes=2, per_class=3)
    queries = labelled_folder(tmp_path / "q", "val", classes=2, per_class=2)
    output = tmp_path / "pixels.json"
    argv = ["--baseline", "pixels", "--database", str(database), "--queries", str(queries), "--output", str(output)]
    code, _, err = run_command(retrieval, [*argv, "--model", str(tmp_path / "nowhere"), "--index-type", "hnsw"], capsys)
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["features"] == "pixels" and result["dim"] == 3 * 16 * 16
    assert result["gallery"]["index_type"] == "hnsw" and result["queries"]["embedded"] == 4


@pytest.mark.parametrize(
    "case",
    ["empty database", "empty queries", "missing folder", "unlabelled images", "absent class", "no model", "bad k"],
)
def test_retrieval_bad_input_is_one_line_and_exit_1(case, model_dir, tmp_path, capsys):
    database = labelled_folder(tmp_path / "db", "train", classes=2, per_class=2)
    queries = labelled_folder(tmp_path / "q", "val", classes=2, per_class=1)
    model = str(model_dir)
    extra: list[str] = []
    if case == "empty database":
        database = tmp_path / "empty"
        database.mkdir()
    elif case == "empty queries":
        queries = tmp_path / "empty"
        (queries / "n01440764").mkdir(parents=True)
    elif case == "missing folder":
        database = tmp_path / "missing"
    elif case == "unlabelled images":
        shutil.copy(photo_paths()[0], database / "top-level.jpg")
    elif case == "absent class":
        shutil.copytree(imagenette("val") / "n03888257", queries / "parachute")
    elif case == "no model":
        broken = tmp_path / "broken-model"
        shutil.copytree(model_dir, broken)
        (broken / "model.onnx").write_bytes(b"not onnx")
        model = str(broken)
    elif case == "bad k":
        extra = ["--k", "1,x"]
    argv = ["--model", model, "--database", str(database), "--queries", str(queries), *extra]
    code, out, err = run_command(retrieval, argv, capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("dino retrieval: "), err
    if case == "absent class":
        assert "parachute" in err


# --------------------------------------------------------------------------------------------------
# dino copydetect
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_folders(tmp_path) -> tuple[Path, Path]:
    """5 original photos (ImageNet sample) and 20 distractors (Imagenette train, 2 per class)."""
    originals = tmp_path / "originals"
    originals.mkdir()
    for path in photo_paths()[20:25]:
        shutil.copy(path, originals / path.name)
    distractors = labelled_folder(tmp_path / "distractors", "train", classes=10, per_class=2)
    return originals, distractors


def test_copydetect_finds_copies_with_the_shipped_model(copy_folders, tmp_path, capsys):
    if not (SHIPPED_MODEL / "model.json").is_file():
        pytest.skip(f"the shipped model {SHIPPED_MODEL} is absent")
    originals, distractors = copy_folders
    output, saved = tmp_path / "copydetect.json", tmp_path / "copies"
    argv = ["--model", str(SHIPPED_MODEL), "--originals", str(originals), "--distractors", str(distractors)]
    argv += ["--seed", "0", "--output", str(output), "--save-copies", str(saved)]
    code, out, err = run_command(copydetect, argv, capsys)
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["copies"]["embedded"] == 15 and result["gallery"]["size"] == 25
    assert result["features"] == "cls+gem" and result["gallery"]["dim"] == 2 * 192
    assert result["chance"]["recall_at_1"] == pytest.approx(1 / 25)
    # far above chance (R@1 4%): most copies in the top 5 (a fifth of the database), many at the top
    # (measured with seed 0: R@1 47%, R@5 87%, µAP 52%; seeds 1 and 2: R@1 73% and 40%)
    assert result["recall_at_k"]["1"] >= 0.3 and result["recall_at_k"]["5"] >= 0.7, result
    assert result["micro_ap"] >= 0.3 and result["recall_at_k"]["10"] >= result["recall_at_k"]["5"]
    assert sorted(p.name for p in saved.iterdir()) == sorted(c["copy"] for c in result["per_copy"])
    for copy in saved.iterdir():
        with Image.open(io.BytesIO(copy.read_bytes())) as img:
            assert img.format == "JPEG"
    assert "µAP" in out

    # deterministic: the same seed makes the same copies, and the same numbers
    again = tmp_path / "again.json"
    argv2 = [*argv[:-4], "--output", str(again)]
    assert run_command(copydetect, argv2, capsys)[0] == 0
    assert json.loads(again.read_text())["per_copy"] == result["per_copy"]

    # and better than raw pixels on the same copies (measured: µAP 9%)
    pixels = tmp_path / "pixels.json"
    argv3 = ["--baseline", "pixels", *argv[2:-4], "--output", str(pixels)]
    assert run_command(copydetect, argv3, capsys)[0] == 0
    assert json.loads(pixels.read_text())["micro_ap"] < result["micro_ap"]


def test_copydetect_features_whitening_and_pixels(copy_folders, model_dir, tmp_path, capsys):
    originals, distractors = copy_folders
    common = ["--originals", str(originals), "--distractors", str(distractors), "--copies-per-original", "1"]
    for extra, dim in (
        (["--model", str(model_dir), "--features", "cls", "--whiten"], 19),  # 20 distractors span 19 directions
        (
            [
                "--baseline",
                "pixels",
                "--pixel-size",
                "8",
                "--exclude",
                sorted(distractors.rglob("*.JPEG"))[0].relative_to(distractors).as_posix(),
            ],
            192,
        ),
    ):
        output = tmp_path / "out.json"
        code, _, err = run_command(copydetect, [*common, *extra, "--output", str(output)], capsys)
        assert code == 0, err
        result = json.loads(output.read_text())
        assert result["gallery"]["dim"] == dim and result["copies"]["embedded"] == 5
    assert result["distractors"]["embedded"] == 19 and result["features"] == "pixels"


@pytest.mark.parametrize("case", ["empty originals", "empty distractors", "unknown exclude", "no model", "no copies"])
def test_copydetect_bad_input_is_one_line_and_exit_1(case, tmp_path, capsys):
    originals = tmp_path / "originals"
    originals.mkdir()
    shutil.copy(photo_paths()[0], originals)
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    shutil.copy(photo_paths()[1], distractors)
    extra = ["--baseline", "pixels"]
    if case == "empty originals":
        originals = tmp_path / "none"
        originals.mkdir()
    elif case == "empty distractors":
        distractors = tmp_path / "none"
        distractors.mkdir()
    elif case == "unknown exclude":
        extra += ["--exclude", "nope.jpg"]
    elif case == "no model":
        extra = ["--model", str(tmp_path)]
    elif case == "no copies":
        extra += ["--copies-per-original", "0"]
    code, out, err = run_command(
        copydetect, ["--originals", str(originals), "--distractors", str(distractors), *extra], capsys
    )
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("dino copydetect: "), err
