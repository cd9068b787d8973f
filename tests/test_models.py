"""Model shapes and parameter counts against the published architectures."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F

from lightning_mfac.app import models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "shortcut", "expected"),
    [
        # Option A (zero-padding shortcuts) is the 0.27M ResNet-20 of He et al.; option B adds
        # two 1x1 conv + BatchNorm projections (512 + 64 + 2048 + 128 parameters).
        (models.resnet20, "A", 269_722),
        (models.resnet20, "B", 272_474),
        (models.resnet32, "A", 464_154),
        (models.resnet56, "A", 853_018),
    ],
)
def test_cifar_resnet_param_counts(factory, shortcut, expected):
    model = factory(num_classes=10, shortcut=shortcut)
    assert n_params(model) == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_depth_and_channels():
    model = models.resnet20(num_classes=100, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # 19 convs + 1 linear = 20 weighted layers
    assert {c.out_channels for c in convs} == {16, 32, 64}
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 100)


def test_resnet_shortcut_a_is_parameter_free_and_pads_channels():
    block = models.resnet_cifar.BasicBlock(16, 32, stride=2, shortcut="A")
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0
    with pytest.raises(ValueError, match="shortcut"):
        models.resnet20(shortcut="C")


def test_mobilenet_v1():
    model = models.mobilenet_v1()
    assert n_params(model) == 4_231_976  # the "4.2M" of Howard et al., Table 8
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    model.eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    half = models.mobilenet_v1(num_classes=10, width_mult=0.5)
    assert half.fc.in_features == 512
    assert half(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_quickstart_cnn():
    model = models.quickstart_cnn()
    assert 3_000 <= n_params(model) <= 30_000
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) >= 2
    assert isinstance(model.fc, torch.nn.Linear)
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    # The residual block adds its branch to the identity: with the branch's last BN zeroed the
    # network is exactly the same network without the block; with it, it is not.
    model.eval()

    def without_block(inp):
        h = F.relu(model.bn0(model.stem(inp)))
        h = F.relu(model.bn3(model.down(h)))
        return model.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    with torch.no_grad():
        assert not torch.allclose(model(x), without_block(x), atol=1e-4)
        torch.nn.init.zeros_(model.bn2.weight)
        torch.nn.init.zeros_(model.bn2.bias)
        torch.testing.assert_close(model(x), without_block(x), rtol=0, atol=1e-6)
    assert n_params(models.quickstart_cnn(num_classes=3, in_channels=3, width=8)) < n_params(model)


@pytest.mark.parametrize(
    ("factory", "params_1000"),
    [(models.resnet18, 11_689_512), (models.resnet50, 25_557_032), (models.mobilenet_v2, 3_504_872)],
)
def test_torchvision_models(factory, params_1000):
    assert n_params(factory()) == params_1000
    model = factory(num_classes=10).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_torchvision_cifar_stem():
    model = models.resnet18(num_classes=10, cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_pretrained_offline_error(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="resnet18-f37072fd.pth.*pretrained=False"):
        models.resnet18(pretrained=True)


def test_bert_classifier_offline_and_from_pretrained(tmp_path):
    pytest.importorskip("transformers")
    model = models.bert_classifier(
        num_labels=3,
        vocab_size=100,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 3)
    # The pretrained path, with a local checkpoint instead of the hub.
    model.save_pretrained(tmp_path / "ckpt")
    loaded = models.bert_classifier(num_labels=3, pretrained_name=str(tmp_path / "ckpt")).eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_gpt_lm_is_causal():
    pytest.importorskip("transformers")
    model = models.gpt_lm(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16).eval()
    ids = torch.randint(0, 50, (2, 16))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, 50)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    # Changing the last token must not change the predictions for earlier positions.
    torch.testing.assert_close(model(input_ids=changed).logits[:, :-1], logits[:, :-1])


def test_models_import_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import lightning_mfac.app.models as m\n"
        "m.resnet20()\n"
        "try:\n    m.gpt_lm(10)\nexcept ImportError as e:\n    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORT-ERROR" in out and "pip install transformers" in out
