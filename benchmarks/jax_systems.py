"""seqzoo's side of the decode benchmark (`benchmarks/decode.py`, which runs each system in its own
subprocess): the JAX systems.

- seqzoo: `decoding.greedy` / `decoding.beam_search` in one jitted `lax.while_loop` around the
  model's `decode_step`, as `decode_programs.decode_fn` (and so train.py and eval.py) runs them.
- python_loop: the course's beam search written plainly, one sentence at a time, over the same
  jitted `decode_step` (see `run_python_loop`).

The peers (transformers, CTranslate2) are `benchmarks/baselines.py`; the sizes, sources and cell
timing all systems share are `benchmarks/decode_workload.py`.
"""

from pathlib import Path

import numpy as np

from benchmarks.decode_workload import (
    Config,
    SpecialIds,
    cell_name,
    cell_result,
    log,
    sources,
    special_ids,
    time_runs,
    transformer_hparams,
)


def jax_model(config: Config, family: str):
    """(model, params) of seqzoo's `family` at the benchmark size, random weights from the seed."""
    import jax
    import jax.numpy as jnp

    from experiment import host_memory
    from models import registry

    if family == "transformer":
        hparams = transformer_hparams(config)
        hparams.update(activation_dropout_rate=0.0)
    else:
        hparams = dict(
            cell="gru",
            embed_dim=config.rnn_embed_dim,
            hidden_dim=config.rnn_hidden_dim,
            num_layers=1,
            attention="bahdanau",
            attention_dim=config.rnn_hidden_dim,
        )
    hparams.update(dropout_rate=0.0, dtype=config.dtype)
    if family == "transformer":
        hparams.update(attention_dropout_rate=0.0)
    else:
        hparams.update(src_vocab_size=config.vocab_size, tgt_vocab_size=config.vocab_size)
    model = registry.create_model(family, **hparams)
    dummy = jnp.ones((1, 4), jnp.int32)
    # Op by op: one jitted init holds ~1.1 GB of buffers at opus-mt's size, the process's peak;
    # its programs and freed buffers are dropped after (~300 MiB there).
    params = model.init(jax.random.key(config.seed), dummy, dummy)["params"]
    jax.clear_caches()
    host_memory.return_freed_memory()
    if family == "transformer":  # CTranslate2's Marian starts from a zero embedding: so do we all
        bos = special_ids(config).bos
        params["tgt_embed"]["embedding"] = params["tgt_embed"]["embedding"].at[bos].set(0.0)
    if config.shape == "opus-mt-en-de":  # the weights as a Marian checkpoint, read by the importer
        from interop import marian

        hparams = transformer_hparams(config)
        state = marian.state_dict_from_params(jax.device_get(params), hparams)
        shapes = jax.tree.map(lambda x: x.shape, params)
        params = marian.params_from_state_dict(state, hparams, shapes, "random opus-mt-en-de")
        params = jax.device_put(params)  # numpy arguments would be copied in at every call
    return model, params


def decoding_params(config: Config, model, params):
    """`params` as seqzoo decodes them, as eval.py's `Run` does: int8 kernels first with
    `config.quantize="int8"` (`loading.int8_params`), then `decode_programs.decoding_params`."""
    from experiment import decode_programs

    if config.quantize == "int8":
        from evaluation import loading

        params = loading.int8_params(model, params, "the benchmark's model")
    return decode_programs.decoding_params(model, params)


def no_eos(logits, eos_id: int):
    """Logits `[N, vocab]` with EOS at -inf: every hypothesis runs to gen_len (min length = max)."""
    return logits.at[:, eos_id].set(-np.inf)


def seqzoo_decoder(model, beam: int, gen_len: int, ids: SpecialIds):
    """A jitted `(params, src) -> best tokens [batch, gen_len]`: `decode_programs.step_function`,
    the one train.py and eval.py decode with, with EOS disabled (`no_eos`)."""
    import jax

    import decoding
    from experiment import decode_programs

    @jax.jit
    def run(params, src):
        model_step, state = decode_programs.step_function(model, params, src, gen_len)

        def step_fn(tokens, state):
            logits, state = model_step(tokens, state)
            return no_eos(logits, ids.eos), state

        args = dict(
            bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad, batch_size=src.shape[0], max_len=gen_len
        )
        if beam == 1:
            return decoding.greedy(step_fn, state, **args).sequences
        return decoding.beam_search(step_fn, state, beam_size=beam, alpha=0.6, **args).sequences[
            :, 0
        ]

    return run


class CompileCounter:
    """Counts XLA compilations and sums trace + lowering + compile seconds (jax.monitoring events)."""

    def __init__(self):
        import jax
        from jax._src import dispatch

        self.compiles, self.seconds = 0, 0.0
        events = {
            dispatch.JAXPR_TRACE_EVENT,
            dispatch.JAXPR_TO_MLIR_MODULE_EVENT,
            dispatch.BACKEND_COMPILE_EVENT,
        }

        def listen(event, duration, **_):
            if event in events:
                self.seconds += duration
            if event == dispatch.BACKEND_COMPILE_EVENT:
                self.compiles += 1

        jax.monitoring.register_event_duration_secs_listener(listen)


def run_seqzoo(config: Config, family: str, workdir: Path) -> dict:
    import jax

    from experiment import host_memory

    model, params = jax_model(config, family)
    if family == "transformer":
        np.savez(workdir / "weights.npz", **marian_state_dict(config, params))
    params = decoding_params(config, model, params)
    host_memory.return_freed_memory()  # the params as they were, dropped now: ~100 MiB at opus-mt
    src_all = sources(config)
    counter = CompileCounter()
    cells = []
    for beam, batch in config.cells():
        decode = seqzoo_decoder(model, beam, config.gen_len, special_ids(config))
        src = jax.device_put(src_all[:batch])
        before = counter.seconds
        jax.block_until_ready(decode(params, src))  # trace + compile + one run
        compile_s = counter.seconds - before
        compiles = counter.compiles
        seconds, tokens = time_runs(
            lambda decode=decode, src=src: jax.block_until_ready(decode(params, src)), config
        )
        cells.append(
            cell_result(
                config,
                beam,
                batch,
                seconds,
                tokens,
                compile_s=compile_s,
                recompiles=counter.compiles - compiles,
            )
        )
        log(f"{family} {cell_name(beam, batch)}: {cells[-1]['tokens_per_s']:.0f} tokens/s")
    cells[-1]["bucketing"] = bucketing_check(config, decode, params, counter)
    return {"cells": cells, "versions": jax_versions()}


def bucketing_check(config: Config, decode, params, counter: CompileCounter) -> dict:
    """Batches of sources of varying length, padded to one bucket length as `data.batching` pads
    them, through the (already compiled) `decode` of the last cell: none may compile again."""
    import jax

    batch = config.cells()[-1][1]
    rng = np.random.default_rng(config.seed + 1)
    lengths = rng.integers(max(2, config.src_len // 4), config.src_len + 1, size=(8, batch))
    compiles = counter.compiles
    for row_lengths in lengths:
        src = sources(config)[:batch].copy()
        src[np.arange(config.src_len) >= row_lengths[:, None]] = special_ids(config).pad
        jax.block_until_ready(decode(params, src))
    return {
        "batches": len(lengths),
        "source_lengths": [int(lengths.min()), int(lengths.max())],
        "bucket": config.src_len,
        "recompiles": counter.compiles - compiles,
    }


def run_python_loop(config: Config, family: str, workdir: Path) -> dict:
    """The course's beam search, plainly: Python loops over sentences, steps and hypotheses."""
    import functools

    import jax

    del workdir
    model, params = jax_model(config, family)
    variables = {"params": decoding_params(config, model, params)}
    encode = jax.jit(functools.partial(model.apply, method=model.encode))
    init = jax.jit(functools.partial(model.apply, method=model.init_decode_state), static_argnums=2)
    step = jax.jit(functools.partial(model.apply, method=model.decode_step))
    src_all = sources(config)

    def beam_search(sentence: np.ndarray, beam: int) -> list[int]:
        memory = encode(variables, sentence[None])
        state = init(variables, memory, config.gen_len)
        ids = special_ids(config)
        hypotheses = [(0.0, [], ids.bos, state)]  # (log P, tokens, last token, decoder state)
        for _ in range(config.gen_len):
            candidates = []
            for log_prob, tokens, last, state in hypotheses:
                logits, new_state = step(variables, memory, np.array([last], np.int32), state)
                logits = np.asarray(logits, np.float64)[0]
                shifted = logits - logits.max()
                log_probs = shifted - np.log(np.exp(shifted).sum())
                log_probs[
                    [ids.pad, ids.bos, ids.eos]
                ] = -np.inf  # EOS disabled, as for every system
                for token in np.argpartition(-log_probs, beam)[:beam]:
                    candidates.append(
                        (log_prob + log_probs[token], tokens + [int(token)], int(token), new_state)
                    )
            hypotheses = sorted(candidates, key=lambda h: -h[0])[:beam]
        return hypotheses[0][1]

    cells = []
    for beam, batch in config.cells():

        def run(beam=beam, batch=batch):
            return [beam_search(sentence, beam) for sentence in src_all[:batch]]

        seconds, tokens = time_runs(run, config)
        cells.append(cell_result(config, beam, batch, seconds, tokens))
        log(
            f"python loop {family} {cell_name(beam, batch)}: {cells[-1]['tokens_per_s']:.0f} tokens/s"
        )
    return {"cells": cells, "versions": jax_versions()}


def jax_versions() -> dict:
    import flax
    import jax
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "jax_device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
    }


def marian_state_dict(config: Config, params) -> dict:
    """seqzoo Transformer params as numpy arrays under transformers' MarianMTModel names
    (`interop.marian`, the mapping of `convert.py export`)."""
    from interop import marian

    return marian.state_dict_from_params(params, transformer_hparams(config))
