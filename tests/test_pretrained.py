"""save_pretrained -> from_pretrained: exact round trips for every method and the retrieval model;
mismatches refused with errors that name both sides."""
import json
import os

import pytest
import torch

import vpeft
from vpeft.backbones.build import create_backbone
from vpeft.pretrained import CONFIG_NAME, WEIGHTS_NAME

T = 4
OPTIONS = {"linear_probe": {}, "full_finetune": {}, "st_adapter": {"bottleneck": 16},
           "msta": {"bottleneck": 16, "layers": [1, 2]}, "side4video": {"side_width": 64, "side_layers": 2}}


def _backbone(name="vpeft-tiny", seed=0):
    torch.manual_seed(seed)
    return create_backbone(name)


def _perturb(module):
    with torch.no_grad():   # trained weights that differ from their (often zero) init
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_round_trip_is_exact(method, tmp_path):
    vm = vpeft.adapt(_backbone(), method, num_frames=T, num_classes=5, **OPTIONS[method])
    vm.backbone_name = "vpeft-tiny"
    _perturb(vm)
    vm.save_pretrained(str(tmp_path), classes=list("abcde"))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["method"] == method and cfg["num_frames"] == T and cfg["classes"] == list("abcde")
    assert cfg["backbone"]["name"] == "vpeft-tiny" and len(cfg["backbone"]["fingerprint"]) == 16
    assert os.path.isfile(tmp_path / WEIGHTS_NAME)
    torch.manual_seed(0)   # the name rebuilds the same random backbone
    again = vpeft.from_pretrained(str(tmp_path))
    assert again.method == method and again.classes == list("abcde")
    a, b = vm.adapter_state_dict(), again.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    video = torch.randn(2, T, 3, 32, 32)
    torch.testing.assert_close(again(video), vm(video), rtol=0, atol=0)


def test_video_text_and_retrieval_round_trip(tmp_path):
    from vpeft.tasks.retrieval import RetrievalModel

    vm = vpeft.adapt(_backbone("viclip-tiny"), "msta", num_frames=8, bottleneck=16, layers=[2, 3])
    vm.backbone_name = "viclip-tiny"
    _perturb(vm)
    vm.save_pretrained(str(tmp_path / "vt"))
    torch.manual_seed(0)
    again = vpeft.from_pretrained(str(tmp_path / "vt"))
    video, text = torch.randn(2, 8, 3, 32, 32), torch.randint(1, 1000, (3, 32))
    torch.testing.assert_close(again.encode_video(video), vm.encode_video(video), rtol=0, atol=0)
    torch.testing.assert_close(again.encode_text(text), vm.encode_text(text), rtol=0, atol=0)

    rm = RetrievalModel(vpeft.adapt(_backbone("clip-tiny-text"), "side4video", num_frames=T, side_width=64,
                                    side_layers=2))
    rm.video_model.backbone_name = "clip-tiny-text"
    _perturb(rm)
    rm.save_pretrained(str(tmp_path / "ret"))
    torch.manual_seed(0)
    back = vpeft.from_pretrained(str(tmp_path / "ret"))
    assert isinstance(back, RetrievalModel)
    tok, v = rm.tokenize(["a red square", "a blue circle"]), torch.randn(2, T, 3, 32, 32)
    rm.eval(), back.eval()
    torch.testing.assert_close(back.scores(tok, v), rm.scores(tok, v), rtol=0, atol=0)


def test_mismatches_are_refused(tmp_path):
    vm = vpeft.adapt(_backbone(), "st_adapter", num_frames=T, num_classes=5, bottleneck=16)
    vm.backbone_name = "vpeft-tiny"
    vm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="trained on backbone 'vpeft-tiny', not 'clip-tiny-text'"):
        vpeft.from_pretrained(str(tmp_path), backbone="clip-tiny-text")
    with pytest.raises(ValueError, match=r"fingerprint [0-9a-f]{16}\) differ from .*fingerprint"):
        vpeft.from_pretrained(str(tmp_path), backbone=_backbone(seed=1))    # other weights
    with pytest.raises(ValueError, match="trained on a CLIP backbone, got a ViCLIP"):
        vpeft.from_pretrained(str(tmp_path), backbone=_backbone("viclip-tiny"))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["options"]["bottleneck"] = 8                                           # shapes no longer fit
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"down.bias is \(16,\) in the saved weights, \(8,\) in the rebuilt model"):
        vpeft.from_pretrained(str(tmp_path), backbone=_backbone())
    cfg["options"] = {"bottleneck": 16, "layers": [1, 2]}
    cfg["method"] = "msta"                                                     # other method, other keys
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the rebuilt model: .* missing .* unexpected"):
        vpeft.from_pretrained(str(tmp_path), backbone=_backbone(), check_fingerprint=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        vpeft.from_pretrained(str(tmp_path / "nothing"))
