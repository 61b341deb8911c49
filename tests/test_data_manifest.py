"""Manifest reading: both formats, label kinds, and one clear error per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dali_pipelines import Manifest, ManifestError, read_manifest, write_manifest


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A folder with empty stand-in media files a.webm/a.wav ... e.webm/e.wav (contents are not read)."""
    for stem in "abcde":
        (tmp_path / f"{stem}.webm").write_bytes(b"v")
        (tmp_path / f"{stem}.wav").write_bytes(b"a")
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_classification_paths_relative_to_manifest(media: Path) -> None:
    sub = media / "lists"
    sub.mkdir()
    text = "video,audio,label\n../a.webm,../a.wav,3\n../b.webm,../b.wav,0\n"
    m = read_manifest(write(sub / "train.csv", text))
    assert isinstance(m, Manifest) and len(m) == 2 and m.task == "classification"
    assert m.clips[0].video == media / "a.webm" and m.clips[1].audio == media / "b.wav"
    np.testing.assert_array_equal(m.labels(), np.array([3, 0]))
    assert m.labels().dtype == np.int64


def test_csv_regression_columns_and_unlabelled(media: Path) -> None:
    m = read_manifest(write(media / "r.csv", "video,audio,label_valence,label_arousal\na.webm,a.wav,0.5,-1\n"
                                             "b.webm,b.wav,2,0.25\n"))
    assert m.task == "regression" and m.label_columns == ("label_valence", "label_arousal")
    np.testing.assert_allclose(m.labels(), [[0.5, -1.0], [2.0, 0.25]])
    assert m.labels().dtype == np.float32
    for text in ("video,audio\na.webm,a.wav\n", "video,audio,label\na.webm,a.wav,\nb.webm,b.wav,\n"):
        unlabelled = read_manifest(write(media / "u.csv", text))
        assert unlabelled.task == "unlabelled"
        np.testing.assert_array_equal(unlabelled.labels(), [-1] * len(unlabelled))


def test_hicmae_space_separated_manifests(media: Path) -> None:
    three = read_manifest(write(media / "h.txt", f"{media / 'a.webm'} {media / 'a.wav'} 4\nb.webm b.wav 1\n"))
    assert three.task == "classification" and list(three.labels()) == [4, 1]
    assert three.clips[1].video == media / "b.webm"
    two = read_manifest(write(media / "h2.txt", "a.webm 2\nc.webm 0\n"), fmt="hicmae")
    assert two.clips[1].audio == media / "c.wav" and list(two.labels()) == [2, 0]


def test_csv_blank_rows_before_the_header_are_skipped(media: Path) -> None:
    for blank in ("\n", "\n  \n", ",,\n \t, ,\n"):
        m = read_manifest(write(media / "blank.csv", blank + "video,audio,label\na.webm,a.wav,1\n"))
        assert len(m) == 1 and m.clips[0].video == media / "a.webm" and list(m.labels()) == [1]
        assert m.clips[0].line == blank.count("\n") + 2  # physical line numbers, for error messages
        assert len(read_manifest(media / "blank.csv", fmt="csv")) == 1


def test_hicmae_rows_of_another_width_are_named_by_line(media: Path) -> None:
    text = "a.webm a.wav 1\nb.webm b.wav 2\nc.webm c.wav 1 0.5\nd.webm d.wav 0\n\ne.webm e.wav\n"
    with pytest.raises(ManifestError) as info:
        read_manifest(write(media / "h.txt", text))
    message = str(info.value)
    assert "different numbers of fields than most rows (3: VIDEO AUDIO and 1 label(s)) (2 row(s))" in message
    assert "line 3: 4 fields, expected 3" in message and "line 6: 2 fields, expected 3" in message
    assert "line 1:" not in message and "line 4:" not in message


def test_write_manifest_takes_numpy_labels(media: Path) -> None:
    rows = [(media / "a.webm", media / "a.wav", np.int64(3)), (media / "b.webm", media / "b.wav", np.uint8(0))]
    path = write_manifest(media / "np.csv", rows)
    assert path.read_text().splitlines()[1:] == ["a.webm,a.wav,3", "b.webm,b.wav,0"]
    m = read_manifest(path)
    assert m.task == "classification" and list(m.labels()) == [3, 0]
    rows = [(media / "a.webm", media / "a.wav", np.float32(0.5)), (media / "b.webm", media / "b.wav", 2)]
    np.testing.assert_allclose(read_manifest(write_manifest(media / "f.csv", rows)).labels(), [[0.5], [2.0]])


@pytest.mark.parametrize(
    "labels, columns, expected",
    [
        ([1, None, 2], ("label",), "row 1: no label (None), expected 1: one per label column (label)"),
        ([1.5, (0.5, 1.0)], ("label_v", "label_a"), "row 0: 1 label value(s) 1.5, expected 2"),
        ([(0.5, 1.0), (1.0, 2.0, 3.0)], ("label_v", "label_a"), "row 1: 3 label value(s)"),
        (["12", 1], ("label_v", "label_a"), "row 0: label '12' is not a finite number"),
        ([1, float("nan")], ("label",), "row 1: label nan is not a finite number"),
    ],
)
def test_write_manifest_rejects_labels_that_do_not_fit_the_columns(media: Path, labels, columns, expected) -> None:
    rows = [(media / f"{s}.webm", media / f"{s}.wav", label) for s, label in zip("abc", labels)]
    path = media / "out" / "bad.csv"
    with pytest.raises(ValueError) as info:
        write_manifest(path, rows, columns)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert not path.exists()  # nothing written: no short row, no value under the wrong column


def test_write_manifest_round_trips(media: Path) -> None:
    rows = [(media / "a.webm", media / "a.wav", (0.5, 1.0)), (media / "b.webm", media / "b.wav", (2.0, -3.5))]
    path = write_manifest(media / "out.csv", rows, ("label_v", "label_a"))
    assert path.read_text().splitlines()[1] == "a.webm,a.wav,0.5,1"
    m = read_manifest(path)
    np.testing.assert_allclose(m.labels(), [[0.5, 1.0], [2.0, -3.5]])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "is empty"),
        ("video,audio,label\n", "has no clips"),
        ("video,audio,label,speaker\na.webm,a.wav,1,x\n", "unknown column(s) 'speaker'"),
        ("video,label\na.webm,1\n", "missing column(s) audio"),
        ("video,audio,label,label\na.webm,a.wav,1,1\n", "duplicated column(s) label"),
        ("video,audio,label\na.webm,a.wav,1,extra\n", "line 2: expected 3 fields"),
        ("video,audio,label\na.webm,a.wav,happy\nb.webm,b.wav,1\nc.webm,c.wav,sad\n",
         "line 2: unparsable label(s) 'happy'"),
        ("video,audio,label\na.webm,a.wav,1\nb.webm,b.wav,\n", "line 3: label missing"),
        ("video,audio,label\na.webm,a.wav,1\nzz.webm,a.wav,1\n", "line 3: video file not found"),
        ("video,audio,label\na.webm,missing.wav,1\n", "line 2: audio file not found"),
        ("a.webm a.wav 1\nb.webm b.wav\n", "line 2: 2 fields, expected 3"),
        ("a.webm\n", "one field only"),
    ],
)
def test_bad_manifests_raise_one_clear_error(media: Path, text: str, expected: str) -> None:
    path = write(media / "bad.csv", text)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_error_lists_first_ten_offending_rows(media: Path) -> None:
    rows = "".join(f"missing{i}.webm,a.wav,1\n" for i in range(13))
    with pytest.raises(ManifestError) as info:
        read_manifest(write(media / "many.csv", "video,audio,label\n" + rows))
    message = str(info.value)
    assert "13 row(s)" in message and "missing9.webm" in message and "missing10.webm" not in message
    assert "and 3 more" in message


def test_directories_and_missing_manifest_are_reported(media: Path) -> None:
    (media / "frames").mkdir()
    with pytest.raises(ManifestError, match="is a directory"):
        read_manifest(write(media / "d.csv", "video,audio\nframes,a.wav\n"))
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(media / "nope.csv")
    with pytest.raises(ValueError, match="fmt must be one of"):
        read_manifest(media / "d.csv", fmt="json")
