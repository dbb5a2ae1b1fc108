"""An 8K-token sequence with YaRN scaling, past the original context of 2048 positions: the
engine's chunked prefill over the paged cache and the native decode step after it give
transformers' logits (float32) within 1e-4."""

import torch

import moeray.model
from moeray.engine.attention import StepAttention
from moeray.engine.cache import LatentCache
from moeray.engine.params import SamplingParams
from moeray.engine.runner import ModelRunner
from moeray.engine.scheduler import ScheduledChunk
from moeray.engine.sequence import Sequence
from moeray.kernels.cpu import decoder
from support import write_hf_checkpoint

LENGTH, CHUNK, BLOCK = 8192, 1024, 16
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}


def test_8k_tokens_with_yarn_equal_transformers(tmp_path):
    reference = write_hf_checkpoint(tmp_path, "v3", seed=5, num_hidden_layers=2, max_position_embeddings=4 * 2048,
                                    rope_parameters=YARN)
    model = moeray.model.load(tmp_path)
    assert model.args.max_position_embeddings == LENGTH and model.args.rope_yarn is not None
    ids = torch.randint(0, model.args.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]  # [8192, V]
    assert expected.std() > 0.1

    cache = LatentCache(model.args, LENGTH // BLOCK, BLOCK, torch.float32)
    runner = ModelRunner(model, cache)
    seq = Sequence("long", 0, ids[:-1].tolist(), LENGTH - 1, SamplingParams(), 0,
                   block_table=list(range(LENGTH // BLOCK)))
    prefill = []
    with torch.inference_mode():
        for start in range(0, LENGTH - 1, CHUNK):
            tokens, positions, meta, _ = runner.prepare([ScheduledChunk(seq, start, min(CHUNK, LENGTH - 1 - start))])
            prefill.append(model.logits(model.forward_tokens(tokens, positions, StepAttention(cache, meta))))
    torch.testing.assert_close(torch.cat(prefill), expected[:-1], atol=1e-4, rtol=1e-4)

    # The last position, 8191, as a decode over the 8191 cached ones.
    native = decoder.prepare(model, cache)
    if native is not None:
        last = native.step([ids[-1].item()], [LENGTH - 1], [0], [seq.block_table], BLOCK)
        torch.testing.assert_close(last[0], expected[-1], atol=1e-4, rtol=1e-4)
