"""Tests for mam_clap_plugin.data.manifest: manifests, class lists, label files."""
import pytest

from mam_clap_plugin.data.manifest import (
    ManifestError,
    read_class_list,
    read_labels,
    read_manifest,
    write_class_list,
    write_labels,
    write_manifest,
)


def test_manifest_round_trip(tmp_path):
    path = str(tmp_path / "train.tsv")
    write_manifest(path, "/data/audio", ["a/x.wav", "b y.flac"], [16000, 441000])
    assert (tmp_path / "train.tsv").read_text() == "/data/audio\na/x.wav\t16000\nb y.flac\t441000\n"
    manifest = read_manifest(path)
    assert manifest.root == "/data/audio" and manifest.path == path
    assert manifest.paths == ["a/x.wav", "b y.flac"] and manifest.sizes.tolist() == [16000, 441000]
    assert len(manifest) == 2
    assert manifest.full_path(1) == "/data/audio/b y.flac"
    assert manifest.where(0) == f"{path}:2" and manifest.where(1) == f"{path}:3"


@pytest.mark.parametrize("content, line, message", [
    ("", 1, "empty manifest"),
    ("/root\n", 2, "no entries"),
    ("/root\na.wav\t10\nb.wav\n", 3, "2 tab-separated fields"),
    ("/root\na.wav\t10\tx\n", 2, "2 tab-separated fields"),
    ("/root\na.wav\t10\n\n", 3, "2 tab-separated fields"),
    ("/root\na.wav\tten\n", 2, "not an integer"),
    ("/root\na.wav\t5\nb.wav\t-3\n", 3, "negative"),
])
def test_manifest_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(str(path))
    assert str(err.value).startswith(f"{path}:{line}:")


def test_manifest_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found") as err:
        read_manifest(str(tmp_path / "none.tsv"))
    assert "none.tsv" in str(err.value)


def test_class_list_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "classes.txt")
    write_class_list(path, ["Speech", "Dog, bark", "Music"])
    assert read_class_list(path) == ["Speech", "Dog, bark", "Music"]
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ManifestError, match=r"dup.txt:3: duplicate class name 'a' \(first on line 1\)"):
        read_class_list(str(tmp_path / "dup.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ManifestError, match="empty.txt:1: class list is empty"):
        read_class_list(str(tmp_path / "empty.txt"))


def test_labels_round_trip_multi_label(tmp_path):
    path = str(tmp_path / "train.lbl")
    write_labels(path, [[0], [2, 4], [1]])
    assert (tmp_path / "train.lbl").read_text() == "0\n2,4\n1\n"
    assert read_labels(path, num_entries=3, num_classes=5) == [[0], [2, 4], [1]]


def test_labels_length_mismatch_says_both_counts(tmp_path):
    path = tmp_path / "train.lbl"
    path.write_text("0\n1\n")
    with pytest.raises(ManifestError, match="has 2 lines but the manifest has 3 entries") as err:
        read_labels(str(path), num_entries=3, num_classes=5)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, line, message", [
    ("0\n1,x\n", 2, "class id 'x' is not an integer"),
    ("0\n5\n", 2, r"class id 5 outside \[0, 5\)"),
    ("-1\n0\n", 1, r"class id -1 outside \[0, 5\)"),
    ("0\n\n", 2, "no class ids"),
])
def test_label_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "train.lbl"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message) as err:
        read_labels(str(path), num_entries=2, num_classes=5)
    assert str(err.value).startswith(f"{path}:{line}:")


def test_writers_refuse_bad_fields(tmp_path):
    with pytest.raises(ValueError, match="tab"):
        write_manifest(str(tmp_path / "x.tsv"), "/r", ["a\tb.wav"], [1])
    with pytest.raises(ValueError, match="2 paths but 1 sizes"):
        write_manifest(str(tmp_path / "x.tsv"), "/r", ["a.wav", "b.wav"], [1])
    with pytest.raises(ValueError, match="no class ids"):
        write_labels(str(tmp_path / "x.lbl"), [[0], []])
    with pytest.raises(ValueError, match="not unique"):
        write_class_list(str(tmp_path / "c.txt"), ["a", "a"])
