"""batches.py: every common batch shape feeds a real tiny model, and the rest fail with the fix."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from train_telemetry import TelemetryConfig, TelemetryConfigError
from train_telemetry.batches import (
    BatchFormat,
    BatchFormatCache,
    forward_in_chunks,
    logits_of,
    merge_batches,
    slice_batch,
    structure,
)

DEFAULTS = TelemetryConfig()


class TwoInputNet(nn.Module):
    """model(a, b) -> logits: the seed's Siamese call shape."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * dim, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([a, b], dim=1))


def resolve(batch: object, config: TelemetryConfig = DEFAULTS, need_inputs: bool = True) -> BatchFormat:
    return BatchFormat.resolve(batch, config.input_keys, config.label_key, config.keys_are_default,
                               need_inputs=need_inputs)


def test_dataloader_xy_batches_feed_model_x_with_labels_y() -> None:
    """A TensorDataset's (x, y) batches are fed as model(x), labelled by y, under the default config."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    model = nn.Linear(4, 3)
    batch = next(iter(DataLoader(TensorDataset(x, y), batch_size=8)))
    fmt = resolve(batch)
    assert torch.equal(fmt.call(model, batch), model(x[:8]))
    assert torch.equal(fmt.labels(batch), y[:8])
    assert fmt.batch_size(batch) == 8
    assert fmt.label_name == "1"


def test_three_tuple_feeds_the_first_two_and_labels_with_the_last() -> None:
    """(x1, x2, y) is fed as model(x1, x2), labelled by y."""
    torch.manual_seed(0)
    model = TwoInputNet()
    batch = (torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 3, (8,)))
    fmt = resolve(batch)
    assert torch.equal(fmt.call(model, batch), model(batch[0], batch[1]))
    assert fmt.labels(batch) is batch[2]
    assert fmt.label_name == "2"


def test_seed_dict_uses_the_default_keys_positionally() -> None:
    """The seed's {img1, img2, winner} batch is fed as model(img1, img2), labelled by winner."""
    torch.manual_seed(0)
    model = TwoInputNet()
    batch = {"winner": torch.randint(0, 2, (8,)), "img2": torch.randn(8, 4), "img1": torch.randn(8, 4),
             "ids": list(range(8))}
    fmt = resolve(batch)
    assert torch.equal(fmt.call(model, batch), model(batch["img1"], batch["img2"]))
    assert fmt.labels(batch) is batch["winner"]
    assert (fmt.label_name, fmt.batch_size(batch)) == ("winner", 8)


def test_dict_with_one_label_like_key_feeds_its_other_tensors_in_key_order() -> None:
    """{"a", "b", "target"} is fed as model(a, b) (non-tensor values left out), labelled by target."""
    torch.manual_seed(0)
    model = TwoInputNet()
    batch = {"a": torch.randn(8, 4), "name": "val", "b": torch.randn(8, 4), "target": torch.randint(0, 3, (8,))}
    fmt = resolve(batch)
    assert torch.equal(fmt.call(model, batch), model(batch["a"], batch["b"]))
    assert fmt.label_name == "target"


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def hf_batch(rows: int = 6, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, seq, dtype=torch.int64)
    mask[0, 4:] = 0
    return {
        "input_ids": torch.randint(1, 50, (rows, seq), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(rows, seq, dtype=torch.int64),
        "labels": torch.randint(0, 3, (rows,), generator=g),
    }


def test_hugging_face_dict_feeds_bert_by_keyword_and_logits_come_out_of_its_output() -> None:
    """An HF dict is fed as model(**everything but labels); logits_of finds the ModelOutput's logits."""
    model = tiny_bert()
    batch = hf_batch()
    fmt = resolve(batch)
    with torch.no_grad():
        got = logits_of(fmt.call(model, batch))
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits
    assert got.shape == (6, 3)
    assert torch.equal(got, want)
    assert fmt.labels(batch) is batch["labels"]
    assert (fmt.label_name, fmt.batch_size(batch)) == ("labels", 6)


def test_batch_encoding_is_a_mapping_and_merges_into_a_plain_dict() -> None:
    """A transformers BatchEncoding (a UserDict) resolves like a dict; merged, it is a plain dict."""
    transformers = pytest.importorskip("transformers")
    model = tiny_bert()
    encodings = [transformers.BatchEncoding(hf_batch(seed=s)) for s in (1, 2)]
    fmt = resolve(encodings[0])
    assert fmt.call_style == "kwargs"
    merged = merge_batches(encodings, limit=9)
    assert type(merged) is dict
    assert torch.equal(merged["input_ids"], torch.cat([e["input_ids"] for e in encodings])[:9])
    merged_fmt = resolve(merged)
    assert merged_fmt == fmt
    with torch.no_grad():
        chunked = forward_in_chunks(model, merged, merged_fmt, None, chunk_size=4)
        whole = logits_of(model(**{k: v for k, v in merged.items() if k != "labels"}))
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_positions_from_yaml_pick_inputs_and_labels_of_a_tuple(tmp_path: Path) -> None:
    """input_keys: [1], label_key: 0 from YAML feed a (y, x) batch as model(x), labelled by y."""
    path = tmp_path / "telemetry.yaml"
    path.write_text("input_keys: [1]\nlabel_key: 0\n")
    config = TelemetryConfig.from_yaml(path)
    assert not config.keys_are_default
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fmt = resolve((y, x), config)
    assert torch.equal(fmt.call(model, (y, x)), model(x))
    assert fmt.labels((y, x)) is y
    assert fmt.label_name == "0"


def test_first_and_second_positions_from_yaml(tmp_path: Path) -> None:
    """input_keys: [0], label_key: 1 from YAML resolve an (x, y) list batch to positions 0 and 1."""
    path = tmp_path / "telemetry.yaml"
    path.write_text("telemetry:\n  input_keys: [0]\n  label_key: 1\n")
    config = TelemetryConfig.from_yaml(path)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fmt = resolve([x, y], config)
    assert (fmt.input_keys, fmt.label_key, fmt.label_name) == ((0,), 1, "1")


def test_ambiguous_dict_raises_showing_its_structure_and_the_keys_to_set() -> None:
    """A dict without a recognisable label is an error that shows the batch and names the config keys."""
    batch = {"a": torch.zeros(8, 3), "b": torch.zeros(8)}
    with pytest.raises(TelemetryConfigError) as err:
        resolve(batch)
    msg = str(err.value)
    assert "dict with keys ['a' (tensor [8, 3]), 'b' (tensor [8])]" in msg
    assert "input_keys" in msg and "label_key" in msg and "forward_fn" in msg


def test_configured_keys_missing_from_a_tuple_name_the_missing_keys() -> None:
    """With keys set in the config, a batch without them is an error, not a guess by shape."""
    config = TelemetryConfig(input_keys=["x1", "x2"], label_key="y")
    batch = (torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(8))
    with pytest.raises(TelemetryConfigError) as err:
        resolve(batch, config)
    msg = str(err.value)
    assert "tuple of 3: (tensor [8, 4], tensor [8, 4], tensor [8])" in msg
    assert "['x1', 'x2', 'y']" in msg and "input_keys" in msg and "label_key" in msg


def test_two_label_like_keys_are_ambiguous() -> None:
    """A dict with both 'label' and 'target' is not guessed at."""
    with pytest.raises(TelemetryConfigError, match="label_key"):
        resolve({"x": torch.zeros(2, 1), "label": torch.zeros(2), "target": torch.zeros(2)})


def test_labels_only_resolves_without_inputs() -> None:
    """need_inputs=False (batch statistics) needs only the labels; with inputs required it raises."""
    batch = {"winner": torch.tensor([0, 1, 1])}
    fmt = resolve(batch, need_inputs=False)
    assert torch.equal(fmt.labels(batch), batch["winner"])
    assert (fmt.label_name, fmt.batch_size(batch)) == ("winner", 3)
    with pytest.raises(TelemetryConfigError):
        resolve(batch)
    custom = TelemetryConfig(input_keys=["pixels"], label_key="cls")
    only = resolve({"cls": [1, 0]}, custom, need_inputs=False)
    assert (only.labels({"cls": [1, 0]}), only.batch_size({"cls": [1, 0]})) == ([1, 0], 2)


def test_batch_format_pickles() -> None:
    """A resolved format survives pickling (it travels to the worker) and still feeds the model."""
    fmt = resolve({"input_ids": torch.zeros(2, 3, dtype=torch.int64), "labels": torch.zeros(2)})
    again = pickle.loads(pickle.dumps(fmt))
    assert again == fmt and again.call_style == "kwargs"
    assert pickle.loads(pickle.dumps(resolve((torch.zeros(2), torch.zeros(2))))).input_keys == (0,)


def test_logits_of_every_output_shape() -> None:
    """Tensor, .logits, {"logits"}, and (nested) tuples give the logits; anything else names its type."""
    t = torch.randn(4, 3)

    class Out:
        logits = t

    for out in (t, Out(), {"logits": t, "loss": 0.1}, (t, torch.zeros(1)), [(t, None), "hidden"]):
        assert logits_of(out) is t
    with pytest.raises(TypeError, match="str"):
        logits_of("not logits")


def test_merge_reads_a_dataloader_only_until_it_has_enough_rows() -> None:
    """merge_batches takes the first `limit` rows, reading no more batches than those rows need."""
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20)
    pulled = []

    def batches():
        for b in DataLoader(TensorDataset(x, y), batch_size=4):
            pulled.append(b)
            yield b

    merged = merge_batches(batches(), limit=10)
    assert len(pulled) == 3
    assert isinstance(merged, list)
    assert torch.equal(merged[0], x[:10]) and torch.equal(merged[1], y[:10])
    one = merge_batches((x, y), limit=5)  # one batch, not a list of two batches
    assert isinstance(one, tuple) and torch.equal(one[1], y[:5])


def test_merge_rejects_mixed_structures_and_ragged_lengths() -> None:
    """Batches of different structures, or tensors padded to different lengths, are errors with the fix."""
    with pytest.raises(TelemetryConfigError, match="share one structure"):
        merge_batches([{"x": torch.zeros(2, 1), "y": torch.zeros(2)}, (torch.zeros(2, 1), torch.zeros(2))], 10)
    with pytest.raises(TelemetryConfigError, match="pad"):
        merge_batches([{"input_ids": torch.zeros(2, 5), "labels": torch.zeros(2)},
                       {"input_ids": torch.zeros(2, 7), "labels": torch.zeros(2)}], 10)


def test_slice_batch_slices_rows_and_keeps_the_rest() -> None:
    """Rows of tensors and lists are sliced; 0-d tensors and other values are kept."""
    batch = {"x": torch.arange(6).reshape(3, 2), "ids": ["a", "b", "c"], "scale": torch.tensor(2.0), "tag": "v"}
    part = slice_batch(batch, 1, 3)
    assert torch.equal(part["x"], batch["x"][1:3]) and part["ids"] == ["b", "c"]
    assert part["scale"] is batch["scale"] and part["tag"] == "v"
    assert isinstance(slice_batch((torch.zeros(3), [1, 2, 3]), 0, 1), tuple)


def test_cache_resolves_each_structure_once() -> None:
    """BatchFormatCache gives one format per structure; a new structure is resolved on first sight."""
    cache = BatchFormatCache(DEFAULTS.input_keys, DEFAULTS.label_key, DEFAULTS.keys_are_default)
    a = cache.get((torch.zeros(2, 3), torch.zeros(2)))
    assert cache.get((torch.ones(5, 3), torch.ones(5))) is a
    assert cache.get((torch.zeros(2), torch.zeros(2), torch.zeros(2))).input_keys == (0, 1)
    assert structure([torch.zeros(2), "s"]) == "list of 2: (tensor [2], str)"


def test_cache_fails_again_for_a_structure_that_failed() -> None:
    """A batch structure that cannot be read raises the same error every time it comes back."""
    cache = BatchFormatCache(DEFAULTS.input_keys, DEFAULTS.label_key, DEFAULTS.keys_are_default)
    messages = []
    for rows in (4, 6):
        with pytest.raises(TelemetryConfigError) as err:
            cache.get({"a": torch.zeros(rows, 3), "b": torch.zeros(rows)})
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "dict with keys ['a' (tensor [4, 3])" in messages[0]
