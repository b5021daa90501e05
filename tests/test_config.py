"""Configs round-trip through plain dicts, and a misspelt key is an error, not a silent default."""
import pytest

import sd


@pytest.mark.parametrize("cls", [sd.UNetConfig, sd.VAEConfig, sd.CLIPConfig])
def test_config_round_trips_through_a_dict(cls):
    config = cls.tiny()
    assert cls.from_dict(config.to_dict()) == config != cls()


def test_from_dict_names_an_unknown_key_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"^UNetConfig has no field\(s\) 'block_chanels'; valid fields: "
                                         r"in_channels, out_channels, block_channels, .*sample_size$"):
        sd.UNetConfig.from_dict({"block_chanels": [32, 64, 64, 64], "heads": 8})


def test_from_dict_refuses_what_is_not_a_dict():
    with pytest.raises(TypeError, match=r"VAEConfig\.from_dict expects a dict, got list"):
        sd.VAEConfig.from_dict([("block_channels", (32, 32, 64, 64))])
