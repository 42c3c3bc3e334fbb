"""Master side of a job (rank 0): read and validate the input, hand out chunks on demand, write
results as they arrive, notice failed and hung workers, and summarise."""
import functools
import os
import socket
import threading
import time

import numpy as np

from gpt2job import __version__
from gpt2job.chunks import FINISH_INVALID, Completions
from gpt2job.cluster.channel import MpiChannel, Mux, ThreadChannel
from gpt2job.cluster.ending import CtrlC, Ending
from gpt2job.cluster.scheduler import Scheduler, position_cost
from gpt2job.cluster.trace import TRACE, launch_time, trace
from gpt2job.cluster.worker import LocalWorker
from gpt2job.cluster.workers import Outstanding, WorkerState
from gpt2job.errors import AlreadyComplete, UserError, WorkerFailure, plural, say
from gpt2job.files.h5read import check_text_kept
from gpt2job.files.output import OutputStore
from gpt2job.files.progress import Progress, peak_rss_mb, print_summary
from gpt2job.files.dedup import Copies, copies_line, group_identical
from gpt2job.files.prompt_checks import check_room, invalid_fix, validate
from gpt2job.files.read_input import read_prompts
from gpt2job.files.row_settings import read_row_settings
from gpt2job.files.row_stops import check_job_stops, stops_header
from gpt2job.files.score_input import read_score_input, starts_fingerprint, trim, validate_score
from gpt2job.files.validate import check_answer, report_validation
from gpt2job.model.tokenizer import load_tokenizer
from gpt2job.model.weights import describe, fingerprint, load_config
from gpt2job.settings import DEFAULT_CHUNK, PREFETCH, JobSettings

START_GRACE_S = 10.0    # longest wait for slow-starting workers before the ready ones begin


class Master:
    def __init__(self, s: JobSettings, comm, fault_plan=None, channel=None, stop=None):
        self.s = s
        self.stop_asked = stop or threading.Event()   # set (SIGUSR1, job.py): no more chunks out, those out waited for
        # the workers: MPI ranks 1..N-1 (known from the start, so that every end path can stop them), and the
        # master's own thread, added by run() when the master computes; or a channel given (benchmarks/master_scale.py)
        self.channel = Mux([channel] if channel is not None else
                           [MpiChannel(comm)] if comm is not None and comm.Get_size() > 1 else [])
        self.fault_plan = fault_plan or {}
        self.ending = Ending(self.channel, s.chunk_timeout, say)   # what each rank's process is, how it ends
        # prepare() sets these: the input's prompts, row settings, score starts, invalid rows, tokenizer; store, queue
        self.prompts = self.row_settings = self.score_starts = self.invalid = self.enc = None
        self.n_rows, self.store, self.sched, self.progress, self.workers = 0, None, None, None, {}
        self.t_ready = None        # every worker ready
        self.t_start = self.t_last = None   # the first chunk handed out (generation starts); the last result received
        self.first_ready = None    # when the first worker said it was ready (monotonic)
        self.dispatching = False   # work is handed out once all workers are ready
        self.generated = self.n_copies = 0   # tokens generated; rows given another row's completion (dedup)
        self.copies = Copies()     # representative rows -> rows with the same prompt (greedy dedup)
        self.received = []         # results received, not yet submitted to the journal: (worker, comp, us, t_recv)
        self.in_commit = []        # ... submitted, not yet durable
        self.verb = "scored" if s.score else "generated"   # what the progress and summary lines call the tokens
        self.prepare_s, self.phase_start = {}, time.perf_counter()   # where the time to ready goes, on the master

    def took(self, phase):
        """Seconds since the last phase of prepare() (the summary's master_prepare_s; GPT2JOB_TRACE prints them)."""
        now = time.perf_counter()
        self.prepare_s[phase] = round(now - self.phase_start, 3)
        self.phase_start = now
        trace(f"master: {phase} in {self.prepare_s[phase]:.2f} s")

    # ---- set-up: input, validation, output
    def prepare(self):
        s = self.s
        cfg = load_config(s.model, warn=True)
        tokenizer = functools.cache(lambda: load_tokenizer(s.vocab_dir))   # once: text prompts', the output's text
        if s.score:   # `score`: the full rows, and where each one's scored tokens start (files/score_input.py)
            self.prompts, self.score_starts = read_score_input(s.input, tokenizer, s.prepend_eos, cfg.eos_token_id)
            self.took("read_input")
            val = validate_score(self.prompts, self.score_starts, cfg.n_positions, cfg.vocab_size)
        else:
            self.prompts = read_prompts(s.input, tokenizer, cfg.vocab_size)   # uint16 ids when they fit
            self.row_settings = read_row_settings(s.input, len(self.prompts), s)    # None: the flags hold for every row
            self.took("read_input")
            check_room(self.prompts, cfg.n_positions, s.max_new_tokens, self.row_settings)
            val = validate(self.prompts, cfg.n_positions, cfg.vocab_size,
                           self.row_settings.max_new_tokens if self.row_settings else s.max_new_tokens)
        shown = s.converted_from or s.input   # the file the user gave (a text file: not its conversion)
        if val.n_invalid and not s.skip_invalid:
            raise UserError(val.message(), shown, self.prompts.source, invalid_fix(s.score, self.row_settings, val))
        N = s.num_samples         # --num-samples: output row r is sample r % N of prompt r // N
        self.n_rows = len(self.prompts) * N
        self.invalid = np.repeat(val.invalid, N) if N > 1 else val.invalid
        if s.validate:   # its size or rows against the output's: said now, not after the job
            check_answer(s.validate, self.n_rows)
        if val.n_invalid:
            say(f"{shown}: {val.message()} -- marked 'invalid' (--skip-invalid)")
        try:
            self.enc = None if s.score else tokenizer()     # a score output has no text
        except UserError as e:
            self.enc = None
            check_job_stops(s, cfg.vocab_size, self.row_settings, None)   # stop strings need it: that error, no note
            check_text_kept(s.output, s.overwrite)   # a resume would drop the text of the rows it keeps
            say(f"no tokenizer, so no 'completions' text is written ({e}; `export --vocab-dir DIR` decodes it "
                "later; once the job is done, only an --overwrite run adds it to the output)")
        check_job_stops(s, cfg.vocab_size, self.row_settings, self.enc)
        self.took("validate")
        key = {"gpt2job_format": 2, "model_fingerprint": fingerprint(s.model),
               "input_fingerprint": self.prompts.fingerprint(), "n_rows": self.n_rows,
               "settings": s.result_settings()}
        if s.score:     # the same tokens split otherwise into context and continuation are another job
            key["score_starts"] = starts_fingerprint(self.score_starts)
        if self.row_settings:   # only then: outputs without per-row settings keep their key (and resume)
            key["row_settings"] = self.row_settings.key()
        if s.backend == "synthetic":   # made-up tokens: never mixed with a model's on a resume
            key["backend"] = "synthetic"
        self.took("fingerprint")
        attrs = {"gpt2job_version": __version__, "model": s.model, "input": os.path.abspath(s.input),
                 "input_dataset": self.prompts.source, "model_config": cfg.to_dict(),
                 "backend": s.backend, "chunk_size": s.chunk_size, **({"num_samples": N} if N > 1 else {}),
                 **({"input_text_digest": self.prompts.text_digest} if self.prompts.text_digest else {})}
        self.store = OutputStore(s.output, self.n_rows, key, self.prompts.lengths, attrs=attrs,
                                 tokenizer=self.enc, overwrite=s.overwrite, vocab_dir=s.vocab_dir,
                                 stops=stops_header(s, cfg.eos_token_id, self.row_settings))
        self.took("open_output")
        if self.store.resumed_rows:
            say(f"resuming {s.output}: {self.store.resumed_rows:,} of {self.n_rows:,} rows already done")
        bad = np.flatnonzero(self.invalid & ~self.store.done)
        if len(bad):
            self.store.add_many([Completions(-1, bad, np.zeros(len(bad) + 1, np.int64), np.zeros(0, np.int32),
                                             np.full(len(bad), FINISH_INVALID, np.uint8))])
        todo = np.flatnonzero(~self.store.done)
        if s.dedup and s.temperature <= 0 and self.row_settings is None and not s.score:   # per-row settings, score: no
            # greedy: a completion depends on the prompt alone, so each distinct prompt is computed once and
            # its copies get the same result. Only among rows not done, so that a resume finishes every row.
            todo, self.copies = group_identical(self.prompts, todo, N)
            self.n_copies = len(self.copies)
            if self.n_copies:
                say(copies_line(self.n_copies, N))
        self.took("dedup")
        self.sched = Scheduler(self.prompts, todo, s.chunk_size, min_deadline=s.chunk_timeout,
                               prefetch=PREFETCH, row_settings=self.row_settings, max_new_tokens=s.max_new_tokens,
                               num_samples=N, position_cost=0.0 if s.score else position_cost(s.dtype, cfg.n_embd))
        self.took("schedule")
        self.progress = Progress(self.n_rows, int(self.store.done.sum()), s.progress_interval, verb=self.verb)
        todo_tokens = int(self.prompts.lengths[todo // N].sum()) if len(todo) else 0
        new = f"{s.max_new_tokens} new each" if self.row_settings is None else \
            f"{int(self.row_settings.max_new_tokens[todo // N].sum()):,} new in all; {self.row_settings.describe()}" + \
            ("; no dedup" if s.dedup and s.temperature <= 0 else "")
        new = "" if s.score else f", up to {new}"   # (score: 'up to 1 new each' said of no new token)
        samples = f" ({N} samples of each prompt)" if N > 1 else ""
        n = len(self.channel.ranks)
        workers = f"{plural(n, 'worker')} ({plural(n + 1, 'rank')})" if n else "1 worker (one process)"
        say(f"starting: {plural(len(todo), 'row' if N > 1 else 'prompt')} to {'score' if s.score else 'compute'} "
            f"({plural(todo_tokens, 'prompt token')}{new}) of {self.n_rows:,} in {shown}{samples}; "
            f"{workers}; model {describe(s.model)}, backend {s.backend}, dtype {s.dtype}")

    def record(self, w: WorkerState, added, compute_us, t_recv, chunk_id=None):
        """Count a result the store has made durable (added: its new rows and tokens, copies of its prompts included,
        and the tokens the worker computed, copies excluded; None if nothing was new)."""
        self.t_last = max(self.t_last or 0.0, t_recv)
        w.last_result = t_recv
        new_rows, new_tokens, computed = added or (0, 0, 0)
        w.rows += new_rows
        w.tokens += new_tokens
        w.computed_tokens += computed
        w.chunks += 1
        w.compute_s += compute_us / 1e6
        self.generated += new_tokens
        self.progress.update(new_rows, new_tokens, chunk_id)   # in place of the chunk's in-chunk reports

    def commit(self, block=False):
        """The group commit: once the results submitted last are durable (journal written and synced, in the
        background), count them; then submit every result received since, as one group. False while the group in
        flight is not durable yet (block: wait for it). The writer gets what it lags behind by, as it has room."""
        self.store.pump()
        added = self.store.collect(block)
        if added is None:
            return False
        for (w, comp, us, t_recv), a in zip(self.in_commit, added):   # (collect: in the order submitted)
            self.record(w, a, us, t_recv, comp.chunk_id)
        self.in_commit = []
        if self.received:
            self.in_commit, self.received = self.received, []
            t = time.perf_counter()
            self.store.submit([self.copies.attach(c) for _, c, _, _ in self.in_commit])
            trace(f"master: {len(self.in_commit)} results submitted in {1e3 * (time.perf_counter() - t):.1f} ms")
        return True

    # ---- the loop: serve chunks on demand, never block on one worker
    def run(self, gpu_slot, ctrl_c=None):
        """Serve the MPI workers (if any) and the master's own worker thread (gpu_slot not None); ctrl_c: CtrlC."""
        if gpu_slot is not None:
            local = LocalWorker(self.s, gpu_slot, self.fault_plan)
            self.channel.add(ThreadChannel(local))
            local.start()
        self.workers = {r: WorkerState(rank=r) for r in self.channel.ranks}
        if gpu_slot is not None:
            self.workers[0].host = socket.gethostname()
        last_check = 0.0
        self.ending.start_clock()
        while (self.sched.rows_left() and not (self.stop_asked.is_set() and self.live())) or self.store.committing() \
                or any(w.outstanding for w in self.live()) or self.received:   # (stopped, no worker left: that error)
            ctrl_c and ctrl_c.check()
            if not self.live():
                self.commit(block=True) and self.commit(block=True)    # what was received counts, then the end
                kept = int(self.store.done.sum()) if self.store.completed else None   # ('invalid' rows count)
                raise self.ending.no_workers_left(list(self.workers.values()), kept, self.n_rows, self.s.output,
                                                  self.s.overwrite)
            if not self.dispatching:
                self.maybe_start()
            msgs = self.channel.poll()
            polled = time.monotonic()    # every message that came before this is handled next
            for rank, kind, *data in msgs:
                self.handle(self.workers[rank], kind, *data)
            for rank, chunk_id, tokens in self.channel.take_reports():   # progress within chunks still out
                if chunk_id in self.workers[rank].outstanding:
                    self.workers[rank].last_heard = time.monotonic()   # computing: not hung
                    out = self.workers[rank].outstanding[chunk_id]
                    self.progress.report(chunk_id, tokens, len(out.chunk.rows), out.new_tokens)
            self.commit()
            if polled - last_check > 0.5:    # hung workers, finished sends: however busy the master is
                last_check = polled
                self.check_hung(polled)
                self.channel.progress()
            if not msgs:
                self.channel.wait()

    def live(self):
        return [w for w in self.workers.values() if not w.retired]

    def all_ready(self):   # every live worker has said it is ready
        return all(w.ready for w in self.live())

    def maybe_start(self):
        """Hand out work once every worker is ready (or START_GRACE_S after the first one was), so
        that the chunks are shared by all of them rather than grabbed by the first to start."""
        ready, all_ready = [w for w in self.live() if w.ready], self.all_ready()
        if not ready or not (all_ready or time.monotonic() - self.first_ready > START_GRACE_S):
            return
        self.dispatching = True
        if all_ready:
            self.t_ready = time.time()
        trace(f"master: {len(ready)} of {len(self.live())} workers ready, handing out chunks")
        held = max(self.sched.window(w) for w in ready)
        for depth in range(1, held + 1):   # every worker's first chunk before any worker's second
            for w in ready:
                self.feed(w, depth)
        self.channel.flush(0.02, firsts=True)   # the first chunks (idle GPUs wait): moved now, not at our pace
        if self.s.chunk_size or self.sched.even_size:
            held = 1 if self.sched.by_cost and not all_ready else held
            rows = max(w.batch_rows for w in ready)
            merged = f", computed in batches of up to {rows:,} prompts" if held > PREFETCH else ""
            say(f"{plural(len(ready), 'worker')} ready: {self.sched.describe()}, {held} out with each worker "
                f"at a time{merged}")

    def handle(self, w, kind, *data):
        if kind == "result":   # its next chunk goes out now; the result counts once it is durable (commit)
            comp, us, t_recv = data
            if self.s.score:   # the worker scored tokens 1..L-1 of each row: keep the scored ones
                comp = trim(comp, self.score_starts)
            w.outstanding.pop(comp.chunk_id, None)
            w.last_heard = time.monotonic()
            self.received.append((w, comp, us, t_recv))
            if TRACE:
                trace(f"master: chunk {comp.chunk_id} result from rank {w.rank}, received {self.received[-1][3]:.4f}")
            if not w.retired:
                self.feed(w)
        elif kind == "hello":
            (info,) = data
            self.ending.heard_from(w.rank)
            if w.retired:      # ready after its start-up deadline: the job went on without it (no abort at its end)
                return self.ending.let_go(w.rank)
            w.ready, w.host, w.info = True, info.get("host", "?"), info
            self.ending.say_held()    # the job goes on: ranks that failed at start-up are worth a line each now
            w.preferred_chunk = int(info.get("preferred_chunk", DEFAULT_CHUNK))
            w.batch_rows = int(info.get("batch_rows", 0))
            w.last_heard = time.monotonic()
            if self.first_ready is None and not self.dispatching:
                # the master is idle until every worker is ready: gather (and encode) the first chunks now
                self.sched.prebuild(len(self.live()), w.preferred_chunk)
                self.channel.encode_ahead(self.sched.built)
            self.first_ready = self.first_ready or w.last_heard
            if self.dispatching:
                every = self.all_ready()
                if self.t_ready is None and every:
                    self.t_ready = time.time()
                for other in [w] + (self.live() if every and self.sched.by_cost else []):   # see feed
                    self.feed(other)
        elif kind == "error":
            (info,) = data
            self.ending.heard_from(w.rank)
            w.host = info.get("host", w.host)
            where = f"chunk {info['chunk']}" if info.get("chunk") is not None else "start-up"
            self.ending.worker_failed(w, where, info, any(x.ready for x in self.workers.values()))
            w.error = info
            self.retire(w, f"error during {where}: {info['error']}")
            self.ending.let_go(w.rank)   # (one counted hung that fails after all: no MPI_Abort for it)
        elif kind == "failed":   # its process died (only an MPI with ULFM says so): its chunks go to the others
            self.ending.died(w.rank)
            if not w.retired:
                say(f"worker rank {w.rank} on {w.host}: {data[0]}; its chunks go to others")
                self.retire(w, data[0])

    def feed(self, w, upto=None):
        """Hand w chunks until it holds upto of them (default: its window) or none are left; one at most while a
        worker is not ready and chunks are of equal work (about one per worker: the late worker finds its own)."""
        if w.retired or self.stop_asked.is_set():
            return
        upto = self.sched.window(w) if upto is None else upto
        n_active = max(1, len(self.live()))
        if self.sched.by_cost and not self.all_ready():
            upto = 1
        while len(w.outstanding) < upto:
            chunk = self.sched.next_chunk(w, n_active)
            if chunk is None:
                return
            if self.t_start is None:
                self.t_start = time.time()
                self.progress.begin()
            if w.first_sent is None:
                w.first_sent = time.time()
            self.channel.send_chunk(w.rank, chunk)
            most = int(chunk.offsets[-1]) - len(chunk.rows) if self.s.score else self.sched.new_tokens(chunk)  # tokens
            w.outstanding[chunk.chunk_id] = Outstanding(chunk, time.monotonic(), most)
            trace(f"master: chunk {chunk.chunk_id} ({len(chunk.rows)} prompts) to rank {w.rank}")

    def retire(self, w, why):
        w.retired, w.why_retired = True, why
        self.channel.forget(w.rank)
        for out in w.outstanding.values():
            self.sched.give_back(out.chunk)
            self.progress.drop(out.chunk.chunk_id)
        w.outstanding = {}
        for other in self.live():
            if other.ready and self.dispatching:
                self.feed(other)

    def check_hung(self, now):
        for w in self.live():
            if not w.ready and self.ending.late_to_start(now):
                say(f"worker rank {w.rank} did not become ready within {self.ending.startup_timeout:.0f} s; "
                    "going on without it")
                self.ending.count_hung(w.rank)
                self.retire(w, "never became ready (start-up deadline passed)")
            elif self.sched.hung(w, now):
                say(f"worker rank {w.rank} on {w.host} has not answered in time; its chunks go to others")
                self.ending.count_hung(w.rank)
                self.retire(w, "stopped answering (deadline passed)")

    # ---- the end
    def summary(self):
        t_end = time.time()
        # generation: the first chunk handed out -> the last result at the master
        start = self.t_start or t_end
        span = (self.t_last - start) if self.t_last else 0.0
        return {
            "rows_total": self.n_rows, "rows_resumed": self.store.resumed_rows, "rows_invalid": int(self.invalid.sum()),
            "duplicate_prompts": self.n_copies, "generated_tokens": self.generated,
            "throughput_tokens_per_s": self.generated / span if span > 0 else None,
            "time_to_ready_s": self.t_ready - launch_time() if self.t_ready else None,   # None: a rank never was
            "time_to_first_work_s": start - launch_time(), "wall_s": t_end - launch_time(), "generation_s": span,
            "master_prepare_s": self.prepare_s, "master_peak_rss_mb": peak_rss_mb(),
            "workers": [w.summary() for w in self.workers.values()],
        }


def run_master(s: JobSettings, comm, gpu_slot=None, fault_plan=None, stop=None):
    m = Master(s, comm, fault_plan, stop=stop)
    try:
        try:
            m.prepare()
        except AlreadyComplete:
            # a resubmitted batch script with nothing left to do succeeds (other settings were refused above)
            m.ending.shutdown(m.workers)
            say(f"{s.output} is already complete with these settings: nothing to do (--overwrite computes it again)")
        else:
            if m.sched.rows_left():
                with CtrlC() as ctrl_c:   # (raised between the loop's turns)
                    m.run(gpu_slot, ctrl_c)
            m.progress.close()
            missing = int((~m.store.done).sum())
            if missing and m.stop_asked.is_set():   # what the workers did until the stop, then the stop's line
                print_summary(m.summary(), verb=m.verb, stopped=True)
                raise m.ending.stopped_early(m.store, s.output, s.overwrite)
            if missing:   # never mark an output finished with a row missing, whatever went wrong above
                raise WorkerFailure(f"internal error: the job ended with {plural(missing, 'row')} not done; it is not "
                                    f"marked finished: run the same command again to compute them")
            sm = m.summary()
            m.store.finish(sm)
            m.ending.shutdown(m.workers)
            print_summary(sm, verb=m.verb, finished_s=time.time() - launch_time())
        code = report_validation(s.output, s.validate, s.validate_tolerance)
    except BaseException as e:
        if m.store is not None:
            m.store.close(discard_if_empty=True)   # nothing completed: leave no file behind
        m.ending.release_after_error(e, m.workers)
        raise
    return m.ending.end(code)
