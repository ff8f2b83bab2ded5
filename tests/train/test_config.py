import pytest

from dinolab.config import ConfigError, apply_overrides
from dinolab.train.config import TrainConfig
from dinolab.train.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds_a_valid_config(name):
    config = get_recipe(name)
    assert isinstance(config, TrainConfig)
    assert config.crops.global_size % config.model.patch_size == 0


def test_published_recipes_keep_the_paper_values():
    g = get_recipe("vitg14_lvd142m")
    assert (g.model.arch, g.model.patch_size, g.model.drop_path_rate) == ("vit_giant2", 14, 0.4)
    assert (g.heads.dino_prototypes, g.heads.ibot_separate_head, g.heads.dino_bottleneck_dim) == (131072, True, 384)
    assert (g.optim.base_lr, g.optim.layer_decay, g.optim.momentum_teacher, g.optim.weight_decay_end) == (
        2e-4,
        1.0,
        0.994,
        0.2,
    )
    assert g.optim.total_iters == 625_000 and g.optim.warmup_epochs * g.optim.iters_per_epoch == 100_000
    assert g.optim.batch_size_per_process * 256 == 3072
    assert (g.crops.global_size, g.crops.local_size, g.crops.local_crops_number) == (224, 98, 8)
    highres = get_recipe("highres")
    assert highres.crops.global_size == 518 and highres.optim.total_iters == 10_000


def test_overrides_are_typed_and_validated():
    config = apply_overrides(
        get_recipe("cpu_small"),
        ["optim.base_lr=1e-3", "model.drop_path_rate=0.2", "run.data=a,b", "masking.ratio_min_max=0.2,0.4"],
    )
    assert config.optim.base_lr == 1e-3 and config.model.drop_path_rate == 0.2
    assert config.run.data == ["a", "b"] and config.masking.ratio_min_max == (0.2, 0.4)
    assert isinstance(config.run.tensorboard, bool)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.base_lrr=1", "optim.base_lrr"),
        ("optimm.base_lr=1", "optimm"),
        ("model.arch=vit_huge", "model.arch"),
        ("model.drop_path_rate=1.5", "model.drop_path_rate"),
        ("run.tensorboard=maybe", "run.tensorboard"),
        ("optim.epochs=abc", "optim.epochs"),
        ("crops.global_size=100", "crops.global_size"),
        ("loss.centering=softmax", "loss.centering"),
        ("crops.hflip_p=2", "crops.hflip_p"),
        ("no_equals_sign", "section.key=value"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        apply_overrides(get_recipe("cpu_small"), [override])


def test_config_round_trips_through_json(tmp_path):
    config = apply_overrides(get_recipe("cpu_small"), ["run.data=x", "optim.adamw_betas=0.8,0.9"])
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_cpu_matmul_is_validated():
    auto = get_recipe("cpu_small")
    assert auto.run.cpu_matmul == "auto"
    assert apply_overrides(auto, ["run.cpu_matmul=onednn"]).run.cpu_matmul == "onednn"
    with pytest.raises(ConfigError, match=r"run\.cpu_matmul"):
        apply_overrides(auto, ["run.cpu_matmul=mkl"])
