import dataclasses
from pathlib import Path

import pytest

from dit_video.config import ConfigError, from_dict, load_config, save_config, to_dict
from dit_video.diffusion import CosineSchedule, DiffusionConfig, GuidanceConfig, SamplerConfig
from dit_video.toy2d import Toy2DConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs/toy/samplers2d.yaml"


def _error(cls, text: str, tmp_path: Path, overrides=()) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "FILE")


def test_the_shipped_config_loads_and_round_trips(tmp_path):
    cfg = load_config(Toy2DConfig, TOY)
    assert cfg.steps == [4, 16, 64, 256] and cfg.schedule == CosineSchedule(-20.0, 20.0)
    save_config(cfg, tmp_path / "effective.yaml")
    assert load_config(Toy2DConfig, tmp_path / "effective.yaml") == cfg


def test_unknown_keys_name_the_file_and_suggest(tmp_path):
    assert _error(Toy2DConfig, "num_sample: 3\n", tmp_path) == \
        "FILE: num_sample: unknown key (did you mean 'num_samples'?)"
    assert _error(Toy2DConfig, "schedule:\n  logsnr_mx: 3\n", tmp_path) == \
        "FILE: schedule.logsnr_mx: unknown key (did you mean 'logsnr_max'?)"
    assert "known: " in _error(Toy2DConfig, "zzz: 1\n", tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("num_samples: many\n", "FILE: num_samples: expected an int, got 'many'"),
    ("num_samples: 2.5\n", "FILE: num_samples: expected an int, got 2.5"),
    ("num_samples: true\n", "FILE: num_samples: expected an int, got True"),
    ("num_samples: 3\n", "FILE: num_samples: expected an int >= 16, got 3"),
    ("steps: [4, 0]\n", "FILE: steps[1]: expected an int >= 1, got 0"),
    ("steps: [4, x]\n", "FILE: steps[1]: expected an int, got 'x'"),
    ("samplers: [ddim, euler]\n", "FILE: samplers[1]: expected one of 'ddim', 'ddim_eta1', 'ancestral', "
                                  "'ancestral_gamma1', 'pc', got 'euler'"),
    ("schedule: 3\n", "FILE: schedule: expected a mapping, got 3"),
    ("schedule:\n  logsnr_min: .nan\n", "FILE: schedule.logsnr_min: expected a number, got nan"),  # passes any range
    ("schedule:\n  logsnr_max: nan\n", "FILE: schedule.logsnr_max: expected a number, got 'nan'"),
    ("schedule:\n  logsnr_min: 30\n", "FILE: schedule: logsnr_min (30.0) must be below logsnr_max (20.0)"),
    ("out: samples.gif\n", "FILE: out must be a .png path, got 'samples.gif'"),
])
def test_wrong_types_and_ranges_are_one_line_errors(tmp_path, text, expected):
    assert _error(Toy2DConfig, text, tmp_path) == expected


def test_numbers_are_read_the_way_people_write_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("schedule:\n  logsnr_min: -1e1\n  logsnr_max: 15\n")  # YAML 1.1 reads "-1e1" as a string
    cfg = load_config(Toy2DConfig, path)
    assert cfg.schedule.logsnr_min == -10.0 and isinstance(cfg.schedule.logsnr_max, float)


def test_overrides_are_dotted_and_checked(tmp_path):
    cfg = load_config(Toy2DConfig, TOY, ["num_samples=100", "schedule.logsnr_max=15", "steps=[2, 8]",
                                         "schedule.base_resolution=32", "schedule.resolution=64"])
    assert (cfg.num_samples, cfg.schedule.logsnr_max, cfg.steps) == (100, 15.0, [2, 8])
    assert cfg.schedule.shift < 0
    with pytest.raises(ConfigError, match=r"^command line: schedule\.lgsnr_max: unknown key \(did you mean"):
        load_config(Toy2DConfig, TOY, ["schedule.lgsnr_max=3"])
    with pytest.raises(ConfigError, match=r"^command line: num_samples: expected an int >= 16, got 0$"):
        load_config(Toy2DConfig, TOY, ["num_samples=0"])
    with pytest.raises(ConfigError, match=r"^command line: 'steps': expected key=value"):
        load_config(Toy2DConfig, TOY, ["steps"])
    with pytest.raises(ConfigError, match=r"^command line: seed: is a value, not a section$"):
        load_config(Toy2DConfig, TOY, ["seed.x=1"])
    # the file's own errors still name the file
    assert _error(Toy2DConfig, "seed: x\n", tmp_path, ["num_samples=20"]) == "FILE: seed: expected an int, got 'x'"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Toy2DConfig, tmp_path / "nope.yaml")
    assert _error(Toy2DConfig, "steps: [1, 2\n", tmp_path).startswith("FILE: ")
    assert "line" in _error(Toy2DConfig, "a: b: c\n", tmp_path)
    assert _error(Toy2DConfig, "- 1\n- 2\n", tmp_path) == "FILE: expected a mapping of keys at the top level"


def test_diffusion_sections_refuse_settings_that_would_do_nothing():
    with pytest.raises(ConfigError, match="^s.yaml: eta does not apply to the 'ancestral' sampler"):
        from_dict(SamplerConfig, {"sampler": "ancestral", "eta": 0.5}, source="s.yaml")
    with pytest.raises(ConfigError, match="min_snr_gamma applies to weighting 'min_snr' only"):
        from_dict(DiffusionConfig, {"weighting": "snr+1", "min_snr_gamma": 3.0})
    with pytest.raises(ConfigError, match="high_fraction applies to oscillating guidance only"):
        from_dict(GuidanceConfig, {"weight": 3.0, "high_fraction": 0.5})
    ok = from_dict(GuidanceConfig, {"weight": 3.0, "weight_low": None, "threshold_percentile": 0.995})
    assert ok.weight_low is None and ok.threshold_percentile == 0.995
    with pytest.raises(ConfigError, match=r"^config: threshold_percentile: expected a number > 0 and <= 1, got 1.5$"):
        from_dict(GuidanceConfig, {"threshold_percentile": 1.5})


def test_sampler_config_feeds_sample_directly():
    cfg = from_dict(SamplerConfig, {"sampler": "pc", "steps": 20, "corrector_steps": 2})
    assert cfg.kwargs() == dict(sampler="pc", steps=20, eta=0.0, gamma=0.0, corrector_steps=2, delta=0.1)
    import inspect

    from dit_video.diffusion import sample
    assert set(cfg.kwargs()) <= set(inspect.signature(sample).parameters)


def test_to_dict_is_plain_yaml_data():
    d = to_dict(DiffusionConfig())
    assert d == {"prediction": "v", "weighting": "none", "min_snr_gamma": 5.0,
                 "schedule": {"logsnr_min": -20.0, "logsnr_max": 20.0, "base_resolution": None, "resolution": None}}
    assert dataclasses.is_dataclass(from_dict(DiffusionConfig, d))


def test_an_optional_section_reports_its_own_errors():
    """A typo inside a `Section | None` key names the key inside it, not just "a mapping or null"."""
    from dit_video.diffusion import CascadeConfig

    @dataclasses.dataclass
    class Stage:
        cascade: CascadeConfig | None = None

    assert from_dict(Stage, {"cascade": None}).cascade is None
    assert from_dict(Stage, {"cascade": {"spatial": 2}}).cascade == CascadeConfig(spatial=2)
    with pytest.raises(ConfigError, match=r"cascade\.spatal: unknown key \(did you mean 'spatial'\?\)"):
        from_dict(Stage, {"cascade": {"spatal": 2}})
    with pytest.raises(ConfigError, match=r"cascade\.temporal: expected an int >= 1, got 0"):
        from_dict(Stage, {"cascade": {"temporal": 0}})
    with pytest.raises(ConfigError, match="cascade: expected a mapping or null, got 3"):
        from_dict(Stage, {"cascade": 3})
