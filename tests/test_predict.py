"""`affectray predict`: every face of a real group photo and a real video, found, labelled and drawn."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from affectray import cli


def _predict(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli.main(["predict", *argv])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return code, summary, out


def test_every_face_of_a_group_photo_is_found_labelled_and_drawn(capsys, group_photo, tmp_path, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("predict started Ray: for a handful of inputs it costs more than the work")

    monkeypatch.setattr(ray, "init", no_ray)
    photo, tiles = group_photo
    code, summary, out = _predict(capsys, str(photo), "--json", "--out", str(tmp_path / "annotated"))
    assert code == 0, out
    assert summary["model"] == "builtin:fer-minixception" and len(summary["model_id"]) == 16
    (result,) = summary["inputs"]
    faces = result["faces"]
    # Six people, six faces: each tile holds exactly one face's centre.
    centres = [((f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2) for f in faces]
    inside = [[x1 <= cx < x2 and y1 <= cy < y2 for cx, cy in centres] for x1, y1, x2, y2 in tiles]
    assert len(faces) == 6 and all(sum(row) == 1 for row in inside), (faces, tiles)
    for face in faces:
        assert face["label"] == max(face["probs"], key=face["probs"].get)
        assert sum(face["probs"].values()) == pytest.approx(1.0, abs=1e-3) and len(face["probs"]) == 7
    # The smiling FER2013 face (third tile) and the astronaut's smile read as Happiness.
    by_tile = {row.index(True): faces[k] for k, row in enumerate(zip(*inside))}
    assert by_tile[2]["label"] == "Happiness" and by_tile[0]["label"] == "Happiness", by_tile
    # The table lists every face; the annotated copy is the photo with boxes drawn on it.
    assert out.count("group.jpg") >= 6
    drawn = cv2.imread(result["annotated"])
    original = cv2.imread(str(photo))
    assert drawn.shape == original.shape and np.abs(drawn.astype(int) - original).sum() > 0
    x1, y1, _, _ = (round(v) for v in faces[0]["box"])
    assert drawn[max(y1, 0) + 30, max(x1, 0)].tolist() != original[max(y1, 0) + 30, max(x1, 0)].tolist()


def test_a_video_is_sampled_and_one_bad_input_does_not_stop_the_rest(capsys, real_video, tmp_path):
    missing = tmp_path / "missing.jpg"
    code, summary, out = _predict(capsys, str(real_video), str(missing), "--every", "12", "--json", "--out",
                                  str(tmp_path / "out"))  # fmt: skip
    assert code == 2  # an input failed: the exit code says so, after the others are done
    video, bad = summary["inputs"]
    assert video["frames"] == 6 and len(video["faces"]) == 6  # 72 frames, every 12th, one face each
    assert [f["frame_index"] for f in video["faces"]] == [0, 12, 24, 36, 48, 60]
    assert cv2.VideoCapture(video["annotated"]).get(cv2.CAP_PROP_FRAME_COUNT) == 6
    assert "missing.jpg" in bad["error"] and not bad["faces"]
    assert summary["failed"] == 1 and summary["faces"] == 6


def test_inputs_that_are_not_images_or_videos_are_refused_by_name(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    assert cli.main(["predict", str(notes)]) == 2
    assert "notes.txt" in capsys.readouterr().err
