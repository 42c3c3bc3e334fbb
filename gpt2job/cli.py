"""Command line: `python -m gpt2job {prompts,run,score,show,validate,export,build-kernels} ...`.

A user mistake prints one line (file, field, fix) and exits with 2; a failed validation exits with 4.
"""
import argparse
import os
import sys
import time

from gpt2job import __version__, envs
from gpt2job.cluster.devices import world_rank
from gpt2job.cluster.trace import launch_time
from gpt2job.errors import Reported, Stopped, UserError, WorkerFailure, exit_code, say, warn
from gpt2job.files.outpaths import after_stop
from gpt2job.model.logprobs import MAX_TOP
from gpt2job.settings import MIN_TEMPERATURE

IN_FORMS = """\
IN forms:
  FILE.h5             input HDF5: 'prompts' (UTF-8 strings) or 'prompt_tokens' (token ids)
  FILE.txt            one prompt per line (blank lines skipped)
  FILE.jsonl          one JSON value per line: "text", {"prompt": ...}/{"text": ...}, {"tokens": [...]} or [ids]
                      A .txt/.jsonl file is converted first, by the same rules as `python -m gpt2job prompts`,
                      into OUT.prompts-HASH.h5 next to OUT (HASH: of the file's bytes; the master writes it; the
                      workers get token chunks). The same file again reuses it and resumes OUT; a changed file is
                      refused as a changed input (--overwrite starts over). e.g. a first job in one line:
                        python -m gpt2job run jobs/example_prompts.txt out.h5 --model gpt2
"""
MODEL_AND_EXITS = """\
--model forms:
  DIR                 Hugging Face folder: config.json + model.safetensors (or sharded)
  NAME                gpt2, gpt2-medium, ..., org/name: from the Hugging Face cache (README: --model)
  FILE.bin            the old system's flat float32 parameter file
  random:gpt2[:SEED]  seeded random weights of GPT-2's shapes (or gpt2-medium, -large, -xl)
  random:n_layer=2,n_head=2,n_embd=32[:SEED]
                      a small random model: any config field (n_layer, n_head, n_embd,
                      n_positions, vocab_size, n_inner, ...), the others as GPT-2's

exit codes:
  0    done (also when the output was already complete with these settings)
  1    an internal error (with its traceback)
  2    a user mistake: one line naming the file, the field and the fix
  3    no worker left: completed rows are kept; run the same command again to resume
  4    --validate failed: more mismatched tokens than --validate-tolerance
  5    stopped on SIGUSR1 once the chunks handed out were done: completed rows are kept; the same command resumes
  130  interrupted (Ctrl-C): completed rows are kept; the same command resumes
  143  (a shell's status) ended by SIGTERM, said in one line: completed rows are kept; the same command resumes"""


SCORE_DESCRIPTION = """\
Per-token log-likelihoods of given rows: for each scored token t, log P(token_t | tokens before it) (log_softmax of
the model's float32 logits, computed in float64, stored as float32), with each row's sum and count.
Rows: 'prompts'/'prompt_tokens' score every token but the first (it has no prediction; --prepend-eos scores it too,
given <|endoftext|>). 'context'+'continuation' texts are tokenized separately and concatenated (lm-eval-harness'
rule; 'context_tokens'+'continuation_tokens' are concatenated): only the continuation is scored."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # prog is "gpt2job" for the main parser, "gpt2job run" for a command's
        command = " ".join(["python -m gpt2job"] + self.prog.split()[1:])
        raise UserError(f"{message} (see `{command} -h`)", field="command line")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a command's unknown flags from the main parser: point at the command's help instead
        a, extra = self.parse_known_args(args, namespace)
        if extra:
            command = " ".join(["python -m gpt2job"] + ([a.command] if getattr(a, "command", None) else []))
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see `{command} -h`)", field="command line")
        return a


def _each(*parsers):
    return lambda *a, **k: [p.add_argument(*a, **k) for p in parsers]


def _positive_int(name, minimum=1):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}")
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {n}")
        return n
    return parse


def _int_in(name, lo, hi):
    def parse(v):
        n = _positive_int(name, lo)(v)
        if n > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {n}")
        return n
    return parse


def _float_in(name, lo, hi, lo_open=False):
    def parse(v):
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}")
        if not (lo < x if lo_open else lo <= x) or x > hi or x != x:
            raise argparse.ArgumentTypeError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return x
    return parse


def _temperature(v):
    x = _float_in("--temperature", 0, 100)(v)
    return 0.0 if x < MIN_TEMPERATURE else x   # greedy below it (settings.MIN_TEMPERATURE)


def _stop_string(v):
    if not v or "\0" in v:
        raise argparse.ArgumentTypeError(f"--stop must be non-empty text without NUL, got {v!r}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"--stop must be UTF-8 text, got {v!r}")
    return v


def _id_list(v):
    """'5' or '5,7' -> [5] or [5, 7] (the vocabulary's bounds are checked once the model is known)."""
    try:
        ids = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stop-token-ids must be integers, got {v!r}")
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"--stop-token-ids must be token ids >= 0, got {v!r}")
    return ids


def build_parser():
    p = Parser(prog="gpt2job", description="Batch GPT-2 generation: HDF5 prompts in, HDF5 completions out.")
    p.add_argument("--version", action="version", version=f"gpt2job {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    pr = sub.add_parser("prompts", help="text, JSONL or raw int32 file -> input HDF5", description="Convert a .txt "
                        "file (one prompt per line; blank lines skipped), a .jsonl file (each line a JSON string, or "
                        "an object with 'prompt'/'text' or 'tokens') or a raw int32 token file (.bin, --tokens-per-row)"
                        " into an input HDF5 file; any other source is refused (an input HDF5 goes to `run` as it is).")
    pr.add_argument("source", help="prompts file: .txt (one per line), .jsonl (not a .json array) or .bin (raw)")
    pr.add_argument("output", help="input HDF5 file to write")
    pr.add_argument("--tokenize", action="store_true",
                    help="store token ids ('prompt_tokens') instead of text ('prompts'); needs the tokenizer")
    pr.add_argument("--vocab-dir", help="folder with GPT-2's vocab.bpe and encoder.json (env GPT2_VOCAB_DIR)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing prompts file (never a job's output)")
    pr.add_argument("--tokens-per-row", type=_positive_int("--tokens-per-row", 0), default=0,
                    help="read SOURCE as the old system's raw int32 token file [N, T] with T tokens per row "
                         "(a .bin file needs it; 16 for the seed workload's input.bin)")

    r = sub.add_parser("run", help="run a generation job (under mpirun: rank 0 is the master)",
                       description="Generate completions for every prompt of IN and write them to OUT.\n"
                                   "Run it under mpirun for many workers; rank 0 is the master.",
                       epilog=IN_FORMS + "\n" + MODEL_AND_EXITS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc = sub.add_parser("score", help="log-likelihoods of given texts or token rows (under mpirun like run)",
                        description=SCORE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="\n".join(x for x in MODEL_AND_EXITS.split("\n") if not x.startswith("  4 ")))
    both = _each(r, sc)   # the flags score shares with run
    r.add_argument("input", help="prompts: input HDF5 with 'prompts' (UTF-8 strings) or 'prompt_tokens' (token ids), "
                                 "or a .txt (one prompt per line) or .jsonl file, converted first (see below)")
    r.add_argument("output", help="output HDF5; an unfinished one from the same command is resumed")
    both("--model", default="random:gpt2",
         help="Hugging Face checkpoint folder (config.json + model.safetensors) or a name in the Hugging Face "
              "cache (gpt2, org/name), the old system's flat float32 .bin file, random:gpt2 / random:gpt2-medium / "
              "-large / -xl[:SEED] (seeded random weights of the real shapes), or random:n_layer=2,n_head=2,"
              "n_embd=32[:SEED] (a small random model; see below). Default: random:gpt2 (pass a model for real text)")
    r.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=16,
                   help="tokens to generate per prompt (default 16)")
    r.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    r.add_argument("--temperature", type=_temperature, default=0.0,
                   help=f"sampling temperature; 0 (default), or below {MIN_TEMPERATURE}, is greedy argmax")
    r.add_argument("--top-k", type=_int_in("--top-k", 0, 2 ** 31 - 1), default=0,
                   help="sample only among the K most likely tokens (0: no limit)")
    r.add_argument("--top-p", type=_float_in("--top-p", 0, 1, lo_open=True), default=1.0,
                   help="nucleus sampling: the smallest set of tokens holding this probability (default 1.0)")
    r.add_argument("--seed", type=_int_in("--seed", 0, 2 ** 63 - 1), default=0,
                   help="sampling seed; the same seed gives the same completions for any ranks/chunks")
    synthetic = "; synthetic: for tests and benchmarks only, deterministic tokens without a model (no weights loaded)"
    for parser, more in ((r, ("synthetic",)), (sc, ())):   # (score needs a model: no synthetic backend)
        parser.add_argument("--backend", choices=("numpy", "cuda", "auto", *more), default="auto",
                            help="numpy (CPU reference), cuda (our kernels), auto (default: cuda where a GPU and "
                            "pycuda are)" + (synthetic if more else ""))
    both("--dtype", choices=("float32", "float16"), default="float32",
         help="float32 (exact, default) or float16 (tensor cores; cuda only)")
    both("--chunk-size", type=_int_in("--chunk-size", 0, 2 ** 31 - 1), default=0,
         help="prompts per work chunk (0, default: k chunks per worker, at most the backend's preferred "
              "size; equal in prompts or, `run` with ragged prompts or per-row max_new_tokens, in estimated work)")
    both("--vocab-dir", help="folder with GPT-2's vocab.bpe and encoder.json (env GPT2_VOCAB_DIR)")
    both("--overwrite", action="store_true", help="start over (without it OUT resumes; other settings are refused)")
    both("--skip-invalid", action="store_true",
         help="run the valid prompts and mark invalid ones 'invalid' instead of refusing to start")
    r.add_argument("--validate", metavar="ANSWER",
                   help="afterwards compare completion tokens with ANSWER: an int32 file [N, new_tokens] or "
                        "another output file; exit code 4 if the mismatch rate exceeds the tolerance")
    r.add_argument("--validate-tolerance", type=_float_in("--validate-tolerance", 0, 1), default=0.0005,
                   help="allowed fraction of mismatched tokens (default 0.0005 = 0.05%%)")
    both("--share-gpus", action="store_true", help="allow more workers on a node than it has GPUs")
    both("--chunk-timeout", type=_float_in("--chunk-timeout", 1, 1e9), default=120.0,
         help="least seconds a worker may go without a result or a progress report on its oldest chunk "
              "before it counts as hung (scaled up with the chunk's size and the worker's speed; default 120)")
    both("--progress-interval", type=_float_in("--progress-interval", 0.1, 1e9), default=10.0,
         help="seconds between progress lines when output is not a terminal (default 10)")
    r.add_argument("--stop", action="append", default=[], metavar="TEXT", type=_stop_string,
                   help="stop string (repeatable; vLLM's `stop`): a row ends once its generated text contains one "
                        "(finish_reason 'stop'); `completions` ends before it, `completion_tokens` keep every "
                        "token generated, `stop_reason` names it. A per-row 'stop' dataset in IN replaces these "
                        "for its rows")
    r.add_argument("--stop-token-ids", action="extend", nargs="+", default=[], metavar="ID", type=_id_list,
                   help="token ids that end a row like <|endoftext|> (vLLM's `stop_token_ids`; space or comma "
                        "separated): the id is kept in completion_tokens, left out of `completions`, and named in "
                        "`stop_reason`; they stop a row even with --ignore-eos")
    r.add_argument("--repetition-penalty", type=_float_in("--repetition-penalty", 0, 1e6, lo_open=True),
                   default=1.0, metavar="P",
                   help="transformers' repetition penalty: the logit of every token already in the prompt or "
                        "the completion is divided by P when positive, multiplied by P when negative; > 1 "
                        "discourages repeats, 1.0 (default) is off")
    r.add_argument("--logprobs", action="store_true",
                   help="store each generated token's log-probability under the model (log_softmax of the raw "
                        "logits, before temperature, top-k/top-p and repetition penalty) in `completion_logprobs`")
    r.add_argument("--top-logprobs", type=_int_in("--top-logprobs", 0, MAX_TOP), default=0, metavar="K",
                   help="also store the K (0..20) most likely tokens of each step and their log-probabilities "
                        "(`top_logprob_ids`, `top_logprobs`); K > 0 implies --logprobs (0, the default: neither)")
    r.add_argument("--num-samples", type=_int_in("--num-samples", 1, 1000), default=1, metavar="N",
                   help="N completions of every prompt (vLLM's n, transformers' num_return_sequences; 1..1000): "
                        "output rows [prompts x N], row r is sample r %% N of prompt r // N (datasets prompt_index, "
                        "sample_index); a prompt's prefill is computed once for its N samples")
    r.add_argument("--layout", choices=("vlen", "flat"), default="vlen",
                   help="how OUT stores each row's tokens and text: vlen (default: one variable-length element a "
                        "row, f['completions'][i]) or flat (for millions of rows: one flat array with a start and "
                        "a length per row, about a quarter of the writer's work a row; see the README)")
    r.add_argument("--no-dedup", action="store_true",
                   help="compute every prompt even when another is identical (a greedy job computes them once)")

    sc.add_argument("input", help="input HDF5 with 'prompts'/'prompt_tokens' (every token but the first is scored) or "
                                  "'context'+'continuation' / 'context_tokens'+'continuation_tokens' (the "
                                  "continuation is scored), or a .txt/.jsonl file of texts (as for run)")
    sc.add_argument("output", help="output HDF5 (token_logprobs, scored_tokens, sum_logprob, n_tokens); resumed "
                                   "like run's")
    sc.add_argument("--prepend-eos", action="store_true",
                    help="put <|endoftext|> (50256) before every row so that its first token is scored too "
                         "(lm-eval-harness' convention); by default the first token of a row without context is "
                         "only the condition (as transformers' loss)")

    sh = sub.add_parser("show", help="print results of an output file", description="Print an output file's state "
                        "(rows done, model, settings) and its rows from --start, at most --limit (tokens, text, ...).")
    sh.add_argument("output", help="output HDF5 written by gpt2job run or score")
    sh.add_argument("--limit", type=_positive_int("--limit", 0), default=10, help="rows to print (default 10)")
    sh.add_argument("--start", type=_positive_int("--start", 0), default=0, help="first row to print")

    v = sub.add_parser("validate", help="compare an output's tokens with expected tokens, or check an input file",
                       description="validate OUT ANSWER: compare an output's tokens with expected tokens. "
                                   "validate IN: check an input file (HDF5, .txt or .jsonl) as `run` would before "
                                   "starting (prompts and per-row settings), for --model and --max-new-tokens.")
    v.add_argument("file", metavar="FILE", help="an output file (with ANSWER), or an input file (alone)")
    v.add_argument("answer", nargs="?", metavar="ANSWER", help="int32 file [N, new_tokens] or another output file")
    v.add_argument("--tolerance", type=_float_in("--tolerance", 0, 1), default=0.0005, help="with ANSWER: the "
                   "largest fraction of compared tokens that may differ (above it: FAIL, exit 4); default 0.0005")
    v.add_argument("--model", default="random:gpt2", help="input check: the model the job will run (its positions "
                   "and vocabulary; default random:gpt2, GPT-2's shapes)")
    v.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=16,
                   help="input check: the job's --max-new-tokens (rows without their own)")
    v.add_argument("--vocab-dir", help="input check: tokenizer files, for text prompts (env GPT2_VOCAB_DIR)")

    ex = sub.add_parser("export", help="write an output's completed rows as JSON lines",
                        description="Write one JSON object per completed row of OUT (row, prompt, completion, "
                                    "completion_tokens, finish_reason, text_exact, and every other per-row dataset "
                                    "such as log-probabilities) to a .jsonl file.")
    ex.add_argument("output", help="output HDF5 written by gpt2job run")
    ex.add_argument("jsonl", help="JSON lines file to write (- for standard output)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing JSON lines file")
    ex.add_argument("--vocab-dir", help="tokenizer files (env GPT2_VOCAB_DIR): the text of a job run without them")

    bk = sub.add_parser("build-kernels", help="compile the CUDA kernels into this node's kernel cache (no GPU "
                        "needed): once per node before a job, so that its ranks start without compiling",
                        description="Compile the CUDA kernels for --arch into this node's kernel cache (nvcc; no GPU).")
    bk.add_argument("--arch", default="", help="the GPU to build for: sm_90a (Hopper: wgmma and TMA products) or "
                    "another sm_XY (mma.sync products); default: this node's GPU, else sm_90a")
    return p


def _refuse_float16_on_numpy(a):
    """Said before any rank starts (make_backend says it on the node where --backend auto finds no GPU)."""
    if a.backend == "numpy" and a.dtype == "float16":
        raise UserError("float16 runs only on the cuda backend", field="--dtype",
                        fix="use --dtype float32 with --backend numpy")


def cmd_run(a):
    from gpt2job.cluster.job import run_job
    from gpt2job.settings import JobSettings
    _refuse_float16_on_numpy(a)
    if a.validate and not os.path.isfile(a.validate):   # said now, not after the job
        raise UserError("no such file", a.validate, "--validate", "give the answer file, or leave --validate out")
    _warn_unused_sampling_flags(a)
    s = JobSettings(input=a.input, output=a.output, model=a.model, max_new_tokens=a.max_new_tokens,
                    ignore_eos=a.ignore_eos, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed, backend=a.backend, dtype=a.dtype, chunk_size=a.chunk_size, num_samples=a.num_samples,
                    vocab_dir=a.vocab_dir, overwrite=a.overwrite, skip_invalid=a.skip_invalid,
                    validate=a.validate, validate_tolerance=a.validate_tolerance, share_gpus=a.share_gpus,
                    chunk_timeout=a.chunk_timeout, progress_interval=a.progress_interval, dedup=not a.no_dedup,
                    stop=tuple(dict.fromkeys(a.stop)), repetition_penalty=a.repetition_penalty,
                    logprobs=a.logprobs or a.top_logprobs > 0, top_logprobs=a.top_logprobs, layout=a.layout,
                    stop_token_ids=tuple(sorted({i for ids in a.stop_token_ids for i in ids})))
    return run_job(s)


def cmd_score(a):
    from gpt2job.cluster.job import run_job
    from gpt2job.settings import JobSettings
    _refuse_float16_on_numpy(a)
    s = JobSettings(input=a.input, output=a.output, model=a.model, max_new_tokens=1, backend=a.backend,
                    dtype=a.dtype, chunk_size=a.chunk_size, vocab_dir=a.vocab_dir,
                    overwrite=a.overwrite, skip_invalid=a.skip_invalid, share_gpus=a.share_gpus,
                    chunk_timeout=a.chunk_timeout, progress_interval=a.progress_interval, dedup=False,
                    logprobs=True, score=True, prepend_eos=a.prepend_eos)
    return run_job(s)


def _warn_unused_sampling_flags(a):
    """Greedy decoding ignores the sampling knobs: say so once (as transformers does), from one rank only."""
    if a.temperature > 0:
        return
    greedy = f"--temperature 0, the default, or below {MIN_TEMPERATURE}"
    if a.num_samples > 1 and world_rank() in (None, 0):
        warn(f"--num-samples {a.num_samples} with greedy decoding ({greedy}) gives {a.num_samples} identical samples "
             f"of each prompt (rows with their own temperature in the input aside); give --temperature >= "
             f"{MIN_TEMPERATURE} to sample")
    given = [f"{flag} {value}" for flag, value, default in (("--top-k", a.top_k, 0), ("--top-p", a.top_p, 1.0),
                                                             ("--seed", a.seed, 0)) if value != default]
    if given and world_rank() in (None, 0):
        warn(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with greedy decoding ({greedy}) "
             f"except on rows with a temperature of their own in the input; give --temperature >= {MIN_TEMPERATURE} "
             "to sample")


def cmd_prompts(a):
    from gpt2job.files.prompt_files import convert
    return convert(a.source, a.output, tokenize=a.tokenize, vocab_dir=a.vocab_dir, overwrite=a.overwrite,
                   tokens_per_row=a.tokens_per_row)


def cmd_show(a):
    from gpt2job.files.show import show
    return show(a.output, a.start, a.limit)


def cmd_export(a):
    from gpt2job.files.export import export
    return export(a.output, a.jsonl, overwrite=a.overwrite, vocab_dir=a.vocab_dir)


def cmd_validate(a):
    from gpt2job.files import input_check, validate
    if a.answer is None:
        return input_check.check_input(a.file, a.model, a.max_new_tokens, a.vocab_dir)
    return validate.report_validation(a.file, a.answer, a.tolerance, field="answer")


def cmd_build_kernels(a):
    from gpt2job.backends.cuda.prebuild import build_kernels
    return build_kernels(a.arch)


# A mistake every rank finds at its start (a bad flag or variable): the master's line is the one printed. Another rank
# waits this long before it exits, since mpirun ends the job (and could drop the master's line) when any rank exits
# with an error; the master's exit ends it sooner. A mistake only this rank found is printed by it after the wait.
RANK_ERROR_GRACE_S = 3.0


def main(argv=None):
    rank, a = world_rank(), None
    try:
        unknown = envs.check_environment()
        if unknown and rank in (None, 0):
            warn(f"{', '.join(unknown)}: not a gpt2job variable, ignored (gpt2job/envs.py declares them all)")
        a = build_parser().parse_args(argv)
        return {"run": cmd_run, "score": cmd_score, "prompts": cmd_prompts, "show": cmd_show, "validate": cmd_validate,
                "export": cmd_export, "build-kernels": cmd_build_kernels}[a.command](a)
    except UserError as e:
        if rank not in (None, 0):
            time.sleep(RANK_ERROR_GRACE_S)
        say(f"error: {e}" if rank in (None, 0) else f"error (rank {rank}): {e}")
        return exit_code(e)
    except (WorkerFailure, Stopped) as e:
        say(f"{'' if isinstance(e, Stopped) else 'error: '}{e}")
        return exit_code(e)
    except Reported as e:   # the master printed it (then waited for ranks still starting)
        return e.code
    except KeyboardInterrupt:   # (a job that completed no row has removed its files by now: the master's close)
        job, out = a is not None and a.command in ("run", "score"), getattr(a, "output", "")
        if rank in (None, 0):   # (a worker rank: Ctrl-C in its start-up, before it ignores SIGINT; the master says it)
            say(f"interrupted{after_stop(out, a.overwrite, launch_time()) if job else ''}")
        return 130
    except BrokenPipeError:   # `show OUT | head`: the reader has gone; end as a killed pipe writer does, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (Python's flush at exit would fail too)
        return 141
