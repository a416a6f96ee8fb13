"""The typed wire protocol: requests round-trip through ConfigRecords, bad entries are named."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from configs.wire import STATISTICS_PREFIX, HandshakeRequest, TrainRequest, WireError

REQUEST = TrainRequest(
    model="dp-ctgan",
    model_params={"embedding_dim": 16, "generator_dims": [32]},
    encoder_json="{}",
    encoder_hash="abc",
    model_rounds=12,
    rounds_before=0,
    budget_share=0.5,
    local_epochs=1,
    batch_size=64,
    seed=7,
    statistics={"numeric-moments": b"\x00\x01"},
)


def test_a_train_request_round_trips_through_its_config_record() -> None:
    config = REQUEST.to_config()
    assert config["model-params"] == '{"embedding_dim": 16, "generator_dims": [32]}'
    assert config[STATISTICS_PREFIX + "numeric-moments"] == b"\x00\x01"
    config["server-round"] = 3  # what the strategy adds
    config["proximal-mu"] = 0.1  # what Flower's FedProx adds
    back = TrainRequest.from_config(config)
    assert back == REQUEST.model_copy(update={"server_round": 3, "proximal_mu": 0.1})
    assert back.rounds_remaining == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model-rounds": "twelve"}, "config entry 'model-rounds'"),
        ({"batch-size": 0}, "config entry 'batch-size'"),
        ({"model-params": "{not json"}, "config entry 'model-params': Value error, not JSON"),
        ({"server-round": 13}, "leave 0 rounds; at least 1 is needed"),
        ({STATISTICS_PREFIX + "pairs": "text"}, "'statistics.pairs' must be bytes"),
    ],
)
def test_a_malformed_entry_is_named(change: dict, message: str) -> None:
    config = REQUEST.to_config()
    for key, value in change.items():
        config[key] = value
    with pytest.raises(WireError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainRequest.from_config(config)


def test_a_missing_entry_or_record_is_named() -> None:
    config = ConfigRecord({k: v for k, v in REQUEST.to_config().items() if k != "encoder-hash"})
    with pytest.raises(WireError, match="'encoder-hash': Field required"):
        TrainRequest.from_config(config)
    with pytest.raises(WireError, match="no 'config' record"):
        HandshakeRequest.from_config(None)
