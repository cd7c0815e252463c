"""The public API a newcomer meets: presets, loaders, inference without autograd, and errors that
name the mistake (issue 13, item 9)."""
import importlib
import inspect
import pydoc

import pytest
import torch

import ctok
from conftest import REPO, conformance_model
from ctok.models.presets import RELEASED_TOKENIZERS, TOKENIZER_PRESET_NAMES
from ctok.models.tokenizer import TokenizerConfig, preset_config


@pytest.fixture(scope="module")
def maetok(conformance_dir):
    return ctok.load_tokenizer(conformance_dir / "maetok_small")  # 64 px images, 16 x 8 latents


@pytest.fixture(scope="module")
def sit(conformance_dir):
    return ctok.load_sit(conformance_dir / "sit_small")


@pytest.fixture(scope="module")
def dit(conformance_dir):
    return ctok.load_dit(conformance_dir / "dit_small")


def images(low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Two 64 px images with values spread over [low, high], both ends reached exactly."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * (high - low) + low
    x[0, 0, 0, :2] = torch.tensor([low, high])
    return x


# -- 1. presets ---------------------------------------------------------------------------------
def test_presets_are_built_from_ctok():
    with torch.device("meta"):  # shapes only: no memory for 175M-675M random weights
        tok = ctok.build_tokenizer("maetok-b-128", image_size=512)
        sit = ctok.build_sit("SiT-XL/1", input_size=tok.num_tokens, in_channels=tok.latent_dim)
        dit = ctok.build_dit("DiT-B/1", input_size=64, in_channels=32, num_classes=10)
    assert (tok.kind, tok.variant, tok.image_size, tok.num_tokens, tok.latent_dim) == ("tokenizer", "maetok", 512,
                                                                                       128, 32)
    assert type(sit) is ctok.SiT and (sit.num_tokens, sit.in_channels, sit.config.depth) == (128, 32, 28)
    assert type(dit) is ctok.DiT and (dit.num_tokens, dit.num_classes, dit.config.hidden_size) == (64, 10, 768)
    with pytest.raises(ValueError, match=r"'DiT-XL/1' is a DiT preset; build_sit builds SiTs: use build_dit"):
        ctok.build_sit("DiT-XL/1", input_size=128, in_channels=32)
    with pytest.raises(ValueError, match=r"'SiT-B/1' is a SiT preset; build_dit builds DiTs: use build_sit"):
        ctok.build_dit("SiT-B/1", input_size=128, in_channels=32)
    with pytest.raises(ValueError, match="unknown generator preset 'SiT-XL/2'"):
        ctok.build_sit("SiT-XL/2", input_size=128, in_channels=32)


def test_a_preset_name_given_to_a_loader_says_what_to_call():
    with pytest.raises(ValueError) as err:
        ctok.load_tokenizer("maetok-b-128")
    assert str(err.value) == ("'maetok-b-128' is a preset name, not a checkpoint: ctok.build_tokenizer('maetok-b-128') "
                              "builds it with random weights; the released weights are the hub id MAETok/maetok-b-128")
    with pytest.raises(ValueError, match=r"'softvq-b-64-512' is a preset name.*no weights of this preset were "
                                         r"released \(those that were: MAETok/maetok-b-128, "):
        ctok.Tokenizer.from_pretrained("softvq-b-64-512")
    # "SiT-XL/1" has the shape of a hub id; it must not be looked up as one.
    with pytest.raises(ValueError, match=r"ctok.build_sit\('SiT-XL/1', input_size=..., in_channels=...\) builds it "
                                         "with random weights; released weights have hub ids like "
                                         r"MAETok/sit-xl_maetok-b-128 \(one per tokenizer\)"):
        ctok.load_sit("SiT-XL/1")
    with pytest.raises(ValueError, match="ctok.build_dit.*no weights of this size were released"):
        ctok.load_dit("DiT-S/1")


def test_every_released_preset_is_a_preset_and_each_trains_with_the_one_generator_recipe():
    from ctok.training.config import load_config
    from ctok.training.generator import SiTTrainConfig, default_out_dir

    assert set(RELEASED_TOKENIZERS) <= set(TOKENIZER_PRESET_NAMES) and len(RELEASED_TOKENIZERS) == 10
    header = (REPO / "src" / "ctok" / "configs" / "sit-xl.yaml").read_text()
    for name, hub_id in RELEASED_TOKENIZERS.items():
        cfg = load_config(SiTTrainConfig, "sit-xl", [f"tokenizer={hub_id}"])
        assert cfg.tokenizer == hub_id and default_out_dir(cfg.model.preset, hub_id) == f"runs/sit-xl_{name}"
        owner, _, base = hub_id.partition("/")
        assert owner in header  # the recipe's header names where the released tokenizers live


@pytest.mark.parametrize("name", TOKENIZER_PRESET_NAMES)
def test_a_preset_config_round_trips_into_the_config_class(name):
    config = TokenizerConfig(**preset_config(name))
    with torch.device("meta"):
        by_class = ctok.Tokenizer(config)
        by_dict = ctok.Tokenizer.from_config(preset_config(name))
    assert by_class.variant == by_dict.variant == name.split("-")[0]
    assert by_class.config == by_dict.config and by_class.to_config() == by_dict.to_config()


def test_a_config_without_its_variant_is_refused_not_built_as_softvq():
    fields = {k: v for k, v in preset_config("maetok-b-128").items() if k != "variant"}
    with pytest.raises(TypeError, match="variant"):
        TokenizerConfig(**fields)
    with pytest.raises(ValueError, match=r"variant must be one of \('softvq', 'maetok'\), got 'vqgan'"):
        TokenizerConfig(variant="vqgan")
    with pytest.raises(TypeError, match="config must be a TokenizerConfig .*got dict"):
        ctok.Tokenizer(preset_config("maetok-b-128"))


# -- 2. from_pretrained ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls, loader, case", [(ctok.Tokenizer, ctok.load_tokenizer, "maetok_small"),
                                               (ctok.SiT, ctok.load_sit, "sit_small"),
                                               (ctok.DiT, ctok.load_dit, "dit_small")])
def test_from_pretrained_is_the_loader(conformance_dir, cls, loader, case):
    model = cls.from_pretrained(conformance_dir / case, device="cpu")
    reference = loader(conformance_dir / case)
    assert type(model) is cls and not model.training
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, reference.state_dict()[k]) for k, a in model.state_dict().items())


# -- 3. inference without autograd, train / eval mode -------------------------------------------------
def test_encode_and_decode_record_no_graph_but_training_forward_does(maetok):
    x = images()
    z = maetok.encode(x)
    assert not z.requires_grad and not maetok.decode(z).requires_grad and not maetok(x).requires_grad
    out = maetok.training_forward(x)
    assert out.rec.requires_grad and out.z.requires_grad and out.rec.grad_fn is not None


def test_the_repr_says_train_or_eval_mode(sit, maetok):
    with torch.device("meta"):
        built = ctok.build_dit("DiT-S/1", input_size=16, in_channels=8)
    assert repr(built).splitlines()[1].strip() == "16 tokens x 8 channels, 1000 classes + the null class, train mode"
    assert "eval mode" in repr(sit).splitlines()[1]
    assert repr(maetok).splitlines()[1].strip() == "maetok, 64 px images <-> 16 x 8 latents, eval mode"


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_samplers_refuse_a_model_in_train_mode(conformance_dir, kind):
    model = (ctok.load_sit if kind == "sit" else ctok.load_dit)(conformance_dir / f"{kind}_small").train()
    sample = ctok.sample_sit if kind == "sit" else ctok.sample_dit
    with pytest.raises(ValueError, match=r"model is in train mode, where label dropout would change the samples: "
                                         r"call model.eval\(\) first"):
        sample(model, torch.randn(2, 16, 8), torch.tensor([1, 2]), num_steps=2)


# -- 4. wrong inputs get a named error -------------------------------------------------------------------
@pytest.mark.parametrize("low, high, message", [
    (0.0, 255.0, r"images must lie in \[-1, 1\], got values in \[0, 255\]; \[0, 255\] pixels convert "
                 r"with x / 127.5 - 1"),
    (-2.1, 2.6, r"got values in \[-2.1, 2.6\]; ImageNet-normalised images\? undo the mean/std"),
    (-1.0, 1.3, r"got values in \[-1, 1.3\]$"),
])
def test_encode_refuses_images_outside_the_range(maetok, low, high, message):
    with pytest.raises(ValueError, match=message):
        maetok.encode(images(low=low, high=high))


def test_encode_tolerates_a_small_overshoot_and_warns_about_a_unit_range_batch(maetok, recwarn):
    maetok.encode(images(low=-1.2, high=1.2))  # a resize's ringing, a decoder's output fed back
    assert not recwarn.list
    with pytest.warns(UserWarning, match=r"images all lie in \[0, 1\] .* pass x \* 2 - 1"):
        maetok.encode(images(low=0.0, high=1.0))


def test_encode_takes_any_float_precision_and_refuses_integer_pixels(maetok):
    x = images()
    assert torch.equal(maetok.encode(x.double()), maetok.encode(x))
    assert maetok.decode(maetok.encode(x).double()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"images must be a floating-point tensor, got dtype torch.uint8: convert "
                                         r"uint8 pixels with x.float\(\) / 127.5 - 1"):
        maetok.encode(((x + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="latents must be a floating-point tensor, got dtype torch.int64"):
        maetok.decode(torch.zeros(1, 16, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="images are on meta but the model is on cpu"):
        maetok.encode(x.to("meta"))


def test_samplers_refuse_the_other_family_and_tokenizers(sit, dit, maetok):
    noise, labels = torch.randn(2, 16, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="sample_dit samples a DiT, but model is a SiT: use sample_sit"):
        ctok.sample_dit(sit, noise, labels, num_steps=2)
    with pytest.raises(ValueError, match="sample_sit samples a SiT, but model is a DiT: use sample_dit"):
        ctok.sample_sit(dit, noise, labels, num_steps=2)
    with pytest.raises(ValueError, match="model must be a SiT, got a maetok tokenizer"):
        ctok.sample_sit(maetok, noise, labels, num_steps=2)
    with pytest.raises(TypeError, match="model must be a DiT .*got str"):
        ctok.sample_dit("SoftVQVAE/dit-xl_softvq-l-64", noise, labels, num_steps=2)


def test_samplers_take_labels_as_a_list_but_not_as_one_int(sit):
    noise = torch.randn(2, 16, 8)
    as_tensor = ctok.sample_sit(sit, noise, torch.tensor([3, 7]), num_steps=2, solver="euler")
    assert torch.equal(ctok.sample_sit(sit, noise, [3, 7], num_steps=2, solver="euler"), as_tensor)
    with pytest.raises(ValueError, match=r"labels must hold one class id per sample \(2\), got the single value 3: "
                                         r"pass \[label\] \* 2"):
        ctok.sample_sit(sit, noise, 3, num_steps=2)
    with pytest.raises(ValueError, match="labels must hold integer class ids, got dtype torch.float32"):
        ctok.sample_sit(sit, noise, [3.0, 7.0], num_steps=2)


@pytest.mark.parametrize("case, loader, message", [
    ("sit_small", ctok.load_tokenizer, r"is a SiT checkpoint, not a tokenizer; load it with ctok.load_sit "
                                       r"\(or SiT.from_pretrained\)"),
    ("sit_small", ctok.load_dit, "is a SiT checkpoint, not a DiT; load it with ctok.load_sit"),
    ("dit_small", ctok.SiT.from_pretrained, "is a DiT checkpoint, not a SiT; load it with ctok.load_dit"),
    ("maetok_small", ctok.load_dit, "is a tokenizer checkpoint, not a DiT; load it with ctok.load_tokenizer"),
])
def test_loaders_name_a_checkpoint_of_another_kind(conformance_dir, case, loader, message):
    with pytest.raises(ValueError, match=message):
        loader(conformance_dir / case)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at checkpoints/run1: checkpoints exists, so "
                                                "checkpoints/run1 is read as a local path, but it holds no run1"):
        ctok.load_tokenizer("checkpoints/run1")
    for path in ("./run1", "runs/a/b", "my runs/b", "run1"):
        with pytest.raises(FileNotFoundError, match=f"no checkpoint folder at {path} "):
            ctok.load_sit(path)


def test_python_loaders_take_device_auto(conformance_dir):
    model = ctok.load_sit(conformance_dir / "sit_small", device="auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:1' ..., got 'gpu'"):
        ctok.load_sit(conformance_dir / "sit_small", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' asks for a GPU, but torch sees no CUDA device here"):
            ctok.load_tokenizer(conformance_dir / "maetok_small", device="cuda")


# -- 5. dir, help and docstrings ---------------------------------------------------------------------------
def test_dir_and_help_list_the_api():
    assert set(ctok.__all__) <= set(dir(ctok))
    text = pydoc.render_doc(ctok, renderer=pydoc.plaintext)
    for name in ctok.__all__:
        assert name in ctok.__doc__, f"the package docstring does not mention {name}"
        assert f"\n    {name}(" in text or f"class {name}" in text, f"help(ctok) does not list {name}"


API_MODULES = ["ctok.hub", "ctok.loading", "ctok.models.base", "ctok.models.files", "ctok.models.tokenizer",
               "ctok.models.diffusion_transformer", "ctok.sampling.flow", "ctok.sampling.gaussian_diffusion",
               "ctok.validation", "ctok.pipeline"]


@pytest.mark.parametrize("module_name", API_MODULES)
def test_public_functions_classes_and_methods_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    undocumented = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not inspect.getdoc(obj):
            undocumented.append(name)
        if not inspect.isclass(obj):
            continue
        for member_name, member in vars(obj).items():  # defined here, not inherited
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if not member_name.startswith("_") and inspect.isfunction(function) and not function.__doc__:
                undocumented.append(f"{name}.{member_name}")
    assert not undocumented, f"{module_name}: no docstring on {undocumented}"


def test_the_samplers_say_their_latents_are_normalised():
    for sampler in (ctok.sample_sit, ctok.sample_dit):
        doc = " ".join(sampler.__doc__.split())
        assert "normalised space" in doc and "LatentPipeline.decode" in doc


# -- 6. loading builds nothing it throws away ----------------------------------------------------------------
def test_loading_builds_on_the_meta_device(conformance_dir, monkeypatch):
    devices = []
    reset = torch.nn.Linear.reset_parameters

    def recording(self):
        devices.append(self.weight.device.type)
        reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", recording)
    ctok.load_tokenizer(conformance_dir / "maetok_small")
    ctok.load_sit(conformance_dir / "sit_small")
    assert len(devices) > 100 and set(devices) == {"meta"}


@pytest.mark.parametrize("case, cls", [("softvq_small", ctok.Tokenizer), ("maetok_small", ctok.Tokenizer),
                                       ("sit_small", ctok.SiT), ("dit_small", ctok.DiT)])
def test_a_loaded_model_is_the_model_built_and_filled_by_hand(conformance_dir, case, cls):
    """Every parameter and buffer, the ones no checkpoint holds included (the time frequencies of
    SiT / DiT), is bit-identical to a model built normally and filled with load_state_dict."""
    loaded = cls.from_pretrained(conformance_dir / case)
    by_hand, _ = conformance_model(case, cls)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    reference = dict(by_hand.named_parameters()) | dict(by_hand.named_buffers())
    assert tensors.keys() == reference.keys()
    for name, tensor in tensors.items():
        expected = reference[name]
        assert (tensor.device.type, tensor.dtype, tensor.requires_grad) == ("cpu", expected.dtype,
                                                                             expected.requires_grad), name
        assert torch.equal(tensor, expected), name
