"""Annotation readers on small files shaped like the datasets' own, incl. malformed lines,
and ``vpeft prepare-data`` (CPU, no videos decoded)."""
import json
import os

import pytest

from vpeft.cli import main
from vpeft.data import ListFileError, read_class_names, read_list
from vpeft.data.annotations import (prepare, read_hmdb51, read_kinetics, read_mmaction, read_msrvtt, read_ssv2,
                                    read_ucf101)


def _w(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _touch(root, *rels):
    for r in rels:
        p = os.path.join(str(root), r)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()


# ---------------------------------------------------------------- SSv2
SSV2_LABELS = '{\n "Approaching something with your camera": "0",\n "Holding something next to something": "1",\n' \
              ' "Pushing something from left to right": "2"\n}\n'
SSV2_TRAIN = """[
{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
 "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
{"id": "42326", "label": "pushing a pen from left to right", "template": "Pushing [something] from left to right",
 "placeholders": ["a pen"]},
{"id": "100904", "label": "spinning a coin", "template": "Spinning [something]", "placeholders": ["a coin"]},
{"label": "no id here", "template": "Approaching [something] with your camera"},
{"id": "3", "label": "approaching a cup", "template": "Approaching [something] with your camera"}
]
"""


def test_ssv2_reader(tmp_path):
    labels = _w(tmp_path / "labels.json", SSV2_LABELS)
    train = _w(tmp_path / "something-something-v2-train.json", SSV2_TRAIN)
    ann = read_ssv2(train, labels)
    assert ann.class_names == ["Approaching something with your camera", "Holding something next to something",
                               "Pushing something from left to right"]
    assert [(e.candidates[0], e.label) for e in ann.entries] == [("78687.webm", 1), ("42326.webm", 2),
                                                                  ("3.webm", 0)]
    assert ann.problems == [f"{train}:6: template 'Spinning something' is not a class of {labels}",
                            f"{train}:7: entry has no 'id'"]


def test_ssv2_bad_labels_file(tmp_path):
    labels = _w(tmp_path / "labels.json", '{\n "a": "0",\n "b": "x"\n}')
    with pytest.raises(ListFileError, match=r"labels.json:3: class index 'x' of 'b' is not an integer"):
        read_ssv2(_w(tmp_path / "t.json", "[]"), labels)
    with pytest.raises(ListFileError, match=r"t.json:2: not valid JSON"):
        read_ssv2(_w(tmp_path / "t.json", '[\n{"id": 1,,}\n]'), _w(tmp_path / "l.json", '{"a": "0"}'))


# ---------------------------------------------------------------- Kinetics
KINETICS = """label,youtube_id,time_start,time_end,split
abseiling,-3B32lodo2M,59,69,train
"air drumming",--nQbRBEz2s,104,114,train
abseiling,badtimes,x,10,train
abseiling,backwards,30,20,train
"air drumming",short,3,13
zumba,zzz,0,10,train
"""


def test_kinetics_reader_and_trim_resolution(tmp_path):
    csv = _w(tmp_path / "kinetics400_train.csv", KINETICS)
    ann = read_kinetics(csv)
    assert ann.class_names == ["abseiling", "air drumming", "zumba"]
    assert [e.label for e in ann.entries] == [0, 1, 2]
    assert ann.entries[0].candidates[0] == "abseiling/-3B32lodo2M_000059_000069.mp4"
    assert ann.problems == [f"{csv}:4: time_start 'x' / time_end '10' are not numbers",
                            f"{csv}:5: time_end 20 is not after time_start 30",
                            f"{csv}:6: expected 5 fields like the header, got 4"]
    # fixed classes (the training split's) for validation
    names = _w(tmp_path / "classes.txt", "abseiling\nair drumming\n")
    fixed = read_kinetics(csv, class_names=names)
    assert fixed.class_names == ["abseiling", "air drumming"]
    assert fixed.problems[-1] == f"{csv}:7: label 'zumba' is not in {names}"
    # under a root: one trimmed clip (another extension), one untrimmed video, one missing
    root = tmp_path / "videos"
    _touch(root, "train/abseiling/-3B32lodo2M_000059_000069.webm", "raw/--nQbRBEz2s.mkv")
    out = prepare("kinetics", [csv], str(tmp_path / "out" / "train.csv"), root=str(root), allow_malformed=True)
    samples = read_list(out.list_file, class_names=read_class_names(out.class_file))
    assert [(s.path, s.label, s.start, s.end) for s in samples] == [
        ("train/abseiling/-3B32lodo2M_000059_000069.webm", 0, None, None),
        ("raw/--nQbRBEz2s.mkv", 1, 104.0, 114.0)]
    assert out.missing == ["zumba/zzz_000000_000010.mp4"]
    assert open(out.missing_file).read() == "zumba/zzz_000000_000010.mp4\n"
    assert any(line.startswith("1 of 3 videos are missing under") for line in out.summary), out.summary


# ---------------------------------------------------------------- UCF-101
def test_ucf101_reader(tmp_path):
    ind = _w(tmp_path / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 Archery\n")
    train = _w(tmp_path / "trainlist01.txt",
               "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g08_c02.avi 3\n"
               "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 3\nBasketball/v_Basketball_g01_c01.avi 4\n")
    test = _w(tmp_path / "testlist01.txt", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\nno_folder.avi\n")
    a = read_ucf101(train, ind)
    assert a.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    assert [(e.candidates[0], e.label) for e in a.entries] == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0),
                                                                ("Archery/v_Archery_g08_c02.avi", 2)]
    assert a.problems == [f"{train}:3: label '3' does not match class 'ApplyLipstick' (index 2 in {ind})",
                          f"{train}:4: class folder 'Basketball' of 'Basketball/v_Basketball_g01_c01.avi' "
                          f"is not in {ind}"]
    b = read_ucf101(test, ind)
    assert [(e.candidates[0], e.label) for e in b.entries] == [("ApplyLipstick/v_ApplyLipstick_g01_c01.avi", 1)]
    assert b.problems == [f"{test}:2: class folder None of 'no_folder.avi' is not in {ind}"]
    with pytest.raises(ListFileError, match=r"classInd.txt:1: expected 'INDEX ClassName'"):
        read_ucf101(train, _w(tmp_path / "classInd.txt", "ApplyEyeMakeup\n"))


# ---------------------------------------------------------------- HMDB-51
def test_hmdb51_reader(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    _w(d / "brush_hair_test_split1.txt", "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
                                         "Aussie_Brush_Hair_brush_hair_h_cm_np1_ba_med_2.avi 2 \nx.avi 0\n")
    _w(d / "cartwheel_test_split1.txt", "Bodenturnen_cartwheel_f_cm_np1_le_med_0.avi 1\nbroken line here\n")
    _w(d / "cartwheel_test_split2.txt", "other.avi 1\n")
    a = read_hmdb51(str(d), 1, "train")
    assert a.class_names == ["brush_hair", "cartwheel"]
    assert [(e.candidates[0], e.label) for e in a.entries] == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0),
        ("cartwheel/Bodenturnen_cartwheel_f_cm_np1_le_med_0.avi", 1)]
    assert a.problems == [f"{d / 'cartwheel_test_split1.txt'}:2: expected 'video.avi 0|1|2', "
                          "got 'broken line here'"]
    t = read_hmdb51(str(d), 1, "test")
    assert [e.candidates[0] for e in t.entries] == ["brush_hair/Aussie_Brush_Hair_brush_hair_h_cm_np1_ba_med_2.avi"]
    with pytest.raises(ListFileError, match=r"no '\*_test_split3.txt' files"):
        read_hmdb51(str(d), 3)


# ---------------------------------------------------------------- MSR-VTT
MSRVTT = {"info": {"year": 2016},
          "videos": [{"video_id": "video0", "split": "train", "id": 0}, {"video_id": "video1", "split": "train"},
                     {"video_id": "video7020", "split": "test"}, {"id": 4}],
          "sentences": [{"caption": "a man is  cooking", "video_id": "video0", "sen_id": 0},
                        {"caption": "someone cooks food", "video_id": "video0", "sen_id": 1},
                        {"caption": "", "video_id": "video1", "sen_id": 2},
                        {"caption": "a cat plays", "video_id": "video7020", "sen_id": 3}]}


def test_msrvtt_reader(tmp_path):
    js = _w(tmp_path / "MSRVTT_data.json", json.dumps(MSRVTT, indent=1))
    lines = open(js).read().splitlines()
    nine = _w(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\n")
    a = read_msrvtt(js, nine)
    assert [(e.candidates[0], e.caption) for e in a.entries] == [("video0.mp4", "a man is cooking"),
                                                                  ("video0.mp4", "someone cooks food")]
    empty_line = next(i for i, ln in enumerate(lines, 1) if '"caption": ""' in ln) - 1   # the item's "{" line
    assert a.problems == [f"{js}:{empty_line}: sentence entry needs 'video_id' and a non-empty 'caption'",
                          f"{nine}:3: video 'video1' has no caption in {js}"]
    test = _w(tmp_path / "MSRVTT_JSFUSION_test.csv",
              "key,vid_key,video_id,sentence\nret0,msr7020,video7020,a cat plays with a toy\nret1,msr7021,,x\n")
    b = read_msrvtt(js, test)
    assert [(e.candidates[0], e.caption) for e in b.entries] == [("video7020.mp4", "a cat plays with a toy")]
    assert b.problems == [f"{test}:3: empty video_id or sentence"]
    c = read_msrvtt(js, None, "test")
    assert [e.caption for e in c.entries] == ["a cat plays"] and len(c.problems) == 2
    assert "video entry needs 'video_id' and 'split'" in c.problems[0]
    assert c.problems[1] == a.problems[0]
    with pytest.raises(ListFileError, match=r"1 malformed entries .*\n.*test.csv:3: empty video_id"):
        prepare("msrvtt", [js, test], str(tmp_path / "o" / "test.txt"))
    out = prepare("msrvtt", [js, test], str(tmp_path / "o" / "test.txt"), allow_malformed=True)
    from vpeft.tasks.retrieval import read_caption_list
    assert read_caption_list(out.list_file) == [("video7020.mp4", "a cat plays with a toy")]
    assert out.class_file is None


# ---------------------------------------------------------------- mmaction2 lists
def test_mmaction_reader(tmp_path):
    lst = _w(tmp_path / "kinetics400_train_list_videos.txt",
             "some/path/000.mp4 1\nsome/path/001.mp4 0\nrawframes/dir-1 163 2\nbad.mp4 1 2 3\nx.mp4 cat\n")
    a = read_mmaction(lst)
    assert [(e.candidates[0], e.label) for e in a.entries] == [("some/path/000.mp4", 1), ("some/path/001.mp4", 0),
                                                                ("rawframes/dir-1", 2)]
    assert a.problems == [f"{lst}:4: expected 'path label' or 'frame_dir total_frames label' (one label), got 4 fields",
                          f"{lst}:5: label 'cat' is not a non-negative integer"]
    names = _w(tmp_path / "classes.txt", "a\nb\n")
    b = read_mmaction(lst, names)
    assert b.class_names == ["a", "b"] and b.problems[0] == f"{lst}:3: label 2 is outside [0, 2) of {names}"


# ---------------------------------------------------------------- the command
def test_prepare_data_command(tmp_path, capsys):
    labels = _w(tmp_path / "labels.json", SSV2_LABELS)
    train = _w(tmp_path / "train.json", SSV2_TRAIN)
    root = tmp_path / "videos"
    _touch(root, "78687.webm", "sub/42326.mp4")
    os.makedirs(root / "frames" / "3")
    _touch(root, "frames/3/img_00001.jpg", "frames/3/img_00002.jpg")
    out = str(tmp_path / "lists" / "train.txt")
    # malformed entries: nothing written, each named FILE:LINE
    assert main(["prepare-data", "ssv2", train, labels, "-o", out, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{train}:6: template 'Spinning something'" in err and f"{train}:7: entry has no 'id'" in err
    assert not os.path.exists(out)
    assert main(["prepare-data", "ssv2", train, labels, "-o", out, "--root", str(root), "--allow-malformed"]) == 0
    err = capsys.readouterr().err
    assert open(out).read() == "78687.webm 1\nsub/42326.mp4 2\nframes/3 0\n"
    assert read_class_names(str(tmp_path / "lists" / "classes.txt"))[1] == "Holding something next to something"
    assert "wrote 3 samples" in err and "missing" not in err
    os.remove(root / "78687.webm")
    assert main(["prepare-data", "ssv2", train, labels, "-o", out, "--root", str(root), "--allow-malformed"]) == 0
    err = capsys.readouterr().err
    missing_lines = [ln for ln in err.splitlines() if "missing" in ln]
    assert len(missing_lines) == 1 and missing_lines[0].startswith("1 of 3 videos are missing under")
    assert open(out + ".missing.txt").read() == "78687.webm\n"
    assert main(["prepare-data", "ucf101", train, "-o", out]) == 2
    assert "ucf101 takes SPLIT.txt classInd.txt, got 1 file(s)" in capsys.readouterr().err
