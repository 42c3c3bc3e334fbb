"""Chunks through the model: submit plans a chunk and starts its upload; run computes the oldest submitted chunk
as a generator that pauses wherever the host would wait for the GPU (gpt2job.backends.base.Pause).

Per chunk:
  * prefill: the prompts' tokens packed ragged ([total_tokens, C], no padding), each token carrying its sequence
    slot and position; ragged causal attention reads the slot's KV cache; the last layer past its keys and values,
    the LM head and token selection run only on each prompt's last position (Model.forward's heads). Prompts that
    start alike compute that prefix once (prefix_share.py: lexicographic order, the shared key/value rows copied per
    layer by kv_copy). Passes hold at most max_prefill_rows tokens (whole prompts).
  * decode: one row per still-active sequence; a step's input tokens are the previous step's output, on the GPU,
    so each step is launched before the previous step's tokens reach the host (one token id per row downloaded,
    logits never leave the GPU). A sequence that stopped is dropped from the step after next.
  * KV cache: per layer [slots, S, C] for K and V, S = the group's longest prompt + its own max_new_tokens. Sequences are
    grouped (plan.kv_groups: even groups) so that the cache fits the KV budget (plan.memory_plan).
  * out of memory (an allocation fails during a chunk, or when it is submitted): the runner waits for the GPU, frees
    its buffers, halves its sizes (the KV budget, prefill rows, head rows; not below their floors) and computes the
    chunk in two halves, each the same way (down to one prompt, whose failure is the chunk's error). See
    plan.split_chunk for why the tokens stay those of a run with room.
  * between chunks: once a chunk's last decode step is launched, the next submitted chunk's prefill is launched
    behind it (_start_next), so the GPU does not wait while the host finishes the chunk and the worker sends it.
Uploads run on the copy stream, compute on the compute stream: a chunk submitted while another computes uploads
meanwhile. self.timeline gets one dict per chunk with CUDA-event times (ms since the backend started) of its
upload, compute, first launch and last download, and the device time of its prefill and decode steps.
"""
from collections import deque

import numpy as np

from gpt2job.backends.base import READY, Pause
from gpt2job.backends.cuda import prefix_share
from gpt2job.backends.cuda.logprobs import StepLogprobs, step_words
from gpt2job.backends.cuda.plan import (KV_FLOOR, ChunkPlan, Layout, Unplanned, check_prompts, group_rows,
                                        join_completions, kv_groups, prefill_passes, size_floors, split_chunk,
                                        step_inputs, step_rows)
from gpt2job.backends.cuda.rows import RowPlan, group_sel, option_buffers
from gpt2job.chunks import FINISH_LENGTH, Completions
from gpt2job.errors import warn
from gpt2job.model.sampling import RowSettings


def pool_buffers(model, head, options, rows, head_rows):
    """(name, bytes) of the device buffers Runner.reserve takes besides the KV cache at these sizes (the chunks'
    uploads: the backend's): a pass's activations, a KV group's decode buffers, the head's, the options';
    options: (a job-wide penalty, --logprobs' K or None), as Runner keeps them."""
    gr = group_rows(rows, head_rows)
    return (model.activation_buffers(rows, head_rows) + decode_buffers(gr)
            + model.head_buffers(head, head_rows, lse=options[1] == 0) + option_buffers(gr, head_rows, model, *options))


def pool_bytes(model, head, options, rows, head_rows):
    """The bytes of pool_buffers (Device.buf takes at least 16)."""
    return sum(max(int(n), 16) for _, n in pool_buffers(model, head, options, rows, head_rows))


def decode_buffers(ns):
    """(name, bytes) of the pool buffers of a KV group of ns sequences: tok_out ([0, ns): a step's tokens; [ns, 2 ns):
    the next step's input when rows left) and step_in (a step's positions, rows, gather indices; then at int32 3 ns
    the step's number, which sampling reads there)."""
    return [("tok_out", 2 * ns * 4), ("step_in", 3 * ns * 4 + 4)]


class Runner:
    def __init__(self, device, model, kernels, kv_budget, max_prefill_rows, share_prefixes, t0, share_gpus=False,
                 head="argmax", penalty=False, logprobs_k=None, t0_wall=None, graphs=None):
        """kv_budget, max_prefill_rows and the model's head rows: the sizes of plan.memory_plan (reserve allocates
        them; an allocation that fails shrinks them)."""
        self.dev, self.model, self.k = device, model, kernels
        self.cfg = model.cfg
        self.kv_budget = kv_budget
        self.max_prefill_rows = int(max_prefill_rows)
        self.share_prefixes = share_prefixes   # submit plans shared prompt prefixes (options.prefix_share)
        self.t0, self.t0_wall = t0, t0_wall   # event: the timeline's origin; its time.time()
        self.share_gpus = share_gpus  # ranks share the GPU: the KV cache is not reserved ahead
        self.head = head              # the head buffers to reserve (Model.head_buffers)
        self.options = (penalty, logprobs_k)   # a job-wide penalty, --logprobs' K (None: off): rows.option_buffers
        self.floors = size_floors(self.max_prefill_rows, model.head_rows, self.cfg.n_positions)
        self.pending = deque()        # submitted ChunkPlans (or Unplanned), oldest first
        self.timeline = deque(maxlen=4096)   # the last chunks' (a job of small chunks has very many)
        self.oom_events = 0           # allocations that failed during chunks (each shrank the sizes)
        self.graphs = graphs          # graphs.StepGraphs: decode steps replayed (options.cuda_graphs), or None
        self.next_started = None      # (plan, its run generator or the error that ended it): _start_next
        self.early_starts = 0         # chunks whose prefill was queued behind the chunk before (_start_next)
        self.halving = 0              # _in_halves calls running: no chunk starts early in them

    # ---------------------------------------------------------------- buffers

    def reserve(self):
        """Allocate the pool's buffers at the current sizes (pool_buffers), then (unless ranks share the GPU: they
        all measured the same free memory) the KV cache at its budget, and the pinned room of two decode steps."""
        dev, rows, hr = self.dev, self.max_prefill_rows, self.model.head_rows
        for name, nbytes in pool_buffers(self.model, self.head, self.options, rows, hr):
            dev.buf(name, nbytes)
        if not self.share_gpus:
            dev.buf("kv", self.kv_budget)
        dev.step_buffers(gr := group_rows(rows, hr), step_words(gr, self.options[1]))   # (--logprobs' room too)

    def shrink(self):
        """Halve the KV budget, the prefill rows and the head rows, none below its floor (or its size, when that
        is lower). Returns whether any changed."""
        def half(v, floor):
            return max(v // 2, floor) if v > floor else v
        old = (self.kv_budget, self.max_prefill_rows, self.model.head_rows)
        self.kv_budget = half(self.kv_budget, KV_FLOOR)
        self.max_prefill_rows = half(self.max_prefill_rows, self.floors[0])
        self.model.set_head_rows(half(self.model.head_rows, self.floors[1]))
        return old != (self.kv_budget, self.max_prefill_rows, self.model.head_rows)

    def fit(self):
        """reserve(); while an allocation fails, shrink and try again (at the floors: raise)."""
        while (err := self._reserve_or_release()) is not None:
            if not self.shrink():
                raise err

    def _reserve_or_release(self):
        """reserve(); where an allocation fails, free the pool and return the error (None: all reserved)."""
        try:
            self.reserve()
        except Exception as e:
            if not self.dev.is_oom(e):
                raise
            self.dev.release()
            return e
        return None

    def sizes(self):
        return (f"prefill passes of {self.max_prefill_rows:,} rows, head groups of {self.model.head_rows:,} rows, "
                f"KV cache budget {self.kv_budget / 2 ** 20:,.0f} MiB")

    def kv_groups(self, lens, extra):
        """plan.kv_groups for prompts of these lengths, each growing by extra positions, in the KV budget; none
        larger than group_rows, the size reserve gave each buffer of a group's decode steps."""
        return kv_groups(lens, extra, self.model.kv_bytes_per_position(), self.kv_budget,
                         group_rows(self.max_prefill_rows, self.model.head_rows))

    # ---------------------------------------------------------------- submit

    def prepare(self, chunk, settings, share):
        """Check the chunk, plan it (shared prompt prefixes computed once when share and that saves enough: the
        prompts then run in the plan's order, the Completions come back in the chunk's) and start uploading it on
        the copy stream. Returns its ChunkPlan at once."""
        drv, cfg = self.dev.drv, self.cfg
        B = len(chunk.rows)
        offsets = np.asarray(chunk.offsets, np.int64)
        lens = np.diff(offsets)
        tokens = np.asarray(chunk.tokens, np.int32)
        rs = RowSettings.of(chunk.params, settings, B)
        check_prompts(lens, tokens, cfg.n_positions, cfg.vocab_size,
                      settings.max_new_tokens if chunk.params is None else rs.max_new_tokens)
        rows = np.asarray(chunk.rows, np.int64)
        sp = None
        if share and B > 1 and (rs.max_new_tokens > 0).any():   # KV groups by each row's length + new tokens
            sp = prefix_share.plan(offsets, tokens, lambda need: self.kv_groups(need, 0), extra=rs.max_new_tokens)
        rp = RowPlan(rs.take(sp.perm) if sp is not None else rs, settings, cfg.vocab_size)
        lay = Layout.of(offsets, lens, tokens, rows, sp, self.model.prefill_attn, rp.rs if rp.per_row else None)
        u = self.dev.take_upload(lay.nbytes)
        lay.write(u.host)
        ev0, ev1 = drv.Event(), drv.Event()
        ev0.record(self.dev.copy)
        if lay.nbytes:
            drv.memcpy_htod_async(u.dev, u.host[:lay.nbytes], self.dev.copy)
        ev1.record(self.dev.copy)
        u.done_evt = ev1
        return ChunkPlan(chunk, settings, lay, u, (ev0, ev1), sp.groups if sp is not None else None,
                         sp.perm if sp is not None else None,
                         int(chunk.offsets[-1]) - lay.T if sp is not None else 0, rp)

    def submit(self, chunk, settings):
        self.pending.append(self._plan(chunk, settings))

    def _plan(self, chunk, settings):
        """prepare(), or Unplanned when memory ran out (device or pinned upload buffer, or the host's)."""
        try:
            return self.prepare(chunk, settings, self.share_prefixes)
        except Exception as e:
            if not self.dev.is_oom(e):
                raise
            return Unplanned(chunk, settings, e)

    # ---------------------------------------------------------------- run

    def run(self):
        """Compute the oldest submitted chunk; yields Pauses, returns its Completions."""
        plan = self.pending.popleft()
        started, self.next_started = self.next_started, None
        if started is None or started[0] is not plan:
            return (yield from self._guarded(plan, 0))
        steps = started[1]
        if isinstance(steps, BaseException):
            raise steps
        yield Pause(True, READY, 0)   # its first pause, taken by _start_next: the prefill computes (submit now)
        return (yield from steps)

    def _start_next(self):
        """Called once the computing chunk has queued all its GPU work: launch the next submitted chunk's prefill behind
        it, so that the GPU goes on while the host reads the last tokens and the worker sends the result (GPU idle
        between small chunks). Its generator stops at its first pause, before any download (the pinned slots the
        finishing chunk reads stay untouched; shared device buffers are ordered by the stream); run() resumes it."""
        if self.next_started is not None or self.halving or not self.pending:
            return
        plan = self.pending[0]
        if not isinstance(plan, ChunkPlan) or not plan.layout.B or plan.rows.n_max <= 0:
            return
        steps = self._guarded(plan, 0)
        try:
            next(steps)   # (a chunk with prompts and new tokens always pauses after its prefill)
        except Exception as e:
            steps = e
        self.next_started = (plan, steps)
        self.early_starts += 1

    def _guarded(self, plan, depth):
        """Run a plan; when memory runs out, compute its chunk in halves instead (_in_halves)."""
        err = plan.error if isinstance(plan, Unplanned) else None
        if err is None:
            try:
                return (yield from self._run(plan))
            except Exception as e:
                if not self.dev.is_oom(e):
                    raise
                err = e
            finally:
                self.done_with(plan)
        return (yield from self._in_halves(plan.chunk, plan.settings, err, depth))

    def _in_halves(self, chunk, settings, err, depth):
        """The chunk ran out of memory (err): wait for the GPU, free the buffer pool and the idle uploads, halve the
        sizes, then compute the chunk's two halves (each guarded the same way) and join their completions. A single
        prompt that runs out of memory raises err: the worker reports it and the master gives the chunk to another.
        The tokens are those of a run with room: see plan.split_chunk. The pool is reserved again at the smaller
        sizes where it fits (else its buffers grow as the halves need them)."""
        self.dev.release()
        self.shrink()
        self._reserve_or_release()
        self.oom_events += 1
        B = len(chunk.rows)
        if depth == 0:
            warn(f"out of GPU memory in chunk {chunk.chunk_id} ({B:,} prompts; "
                 f"{type(err).__name__}: {err}): computing it in halves; now {self.sizes()}")
        if B <= 1:
            raise err
        parts = []
        self.halving += 1   # the next chunk waits for the last half (a half's end is not the chunk's)
        try:
            for part in split_chunk(chunk):
                parts.append((yield from self._guarded(self._plan(part, settings), depth + 1)))
        finally:
            self.halving -= 1
        return join_completions(chunk, parts)

    def _run(self, plan):
        drv, rp, lay = self.dev.drv, plan.rows, plan.layout
        chunk, B = plan.chunk, lay.B
        out = np.zeros((B, max(rp.n_max, 0)), np.int32)   # generated tokens, row b: out[b, :gen[b]]
        gen = np.zeros(B, np.int64)
        finish = np.full(B, FINISH_LENGTH, np.uint8)
        lp = StepLogprobs.of(self.dev, plan.settings, B, rp.n_max)   # OFF unless --logprobs
        self.dev.compute.wait_for_event(plan.ev_up[1])
        ev_c0 = drv.Event()
        ev_c0.record(self.dev.compute)
        if B and rp.n_max > 0:
            groups = plan.groups or self.kv_groups(lay.lens + rp.mnt, 0)
            for i, (b0, b1) in enumerate(groups):
                yield from self._run_group(plan, b0, b1, out, gen, finish, lp, last=i == len(groups) - 1)
        ev_c1 = plan.ev_end
        if ev_c1 is None:
            ev_c1 = drv.Event()
            ev_c1.record(self.dev.compute)
        ev_c1.synchronize()
        t = lambda ev: ev.time_since(self.t0)  # noqa: E731
        entry = {"chunk_id": chunk.chunk_id, "prompts": B, "generated": int(gen.sum()),
                 "shared_prefix_tokens": plan.shared_tokens,
                 "upload": (t(plan.ev_up[0]), t(plan.ev_up[1])), "compute": (t(ev_c0), t(ev_c1)),
                 "origin": self.t0_wall}
        if plan.phases:   # the first prefill launch: from the compute start to it, the host was preparing
            entry["first_launch"] = t(plan.phases[0][1])
        if plan.last_down is not None:
            entry["download"] = (t(plan.last_down[0]), t(plan.last_down[1]))
        for kind, a, b in plan.phases:   # device time of prefill / decode steps (ms)
            entry[kind + "_ms"] = entry.get(kind + "_ms", 0.0) + b.time_since(a)
        self.timeline.append(entry)
        back = None if plan.perm is None else np.empty(B, np.int64)
        if back is not None:   # back to the chunk's order (the prompts ran in the share plan's): the inverse
            back[plan.perm] = np.arange(B)   # permutation (cheaper than an argsort at a chunk's end)
            out, gen, finish = out[back], gen[back], finish[back]
        offs = np.concatenate([np.zeros(1, np.int64), np.cumsum(gen)])
        full = B and int(gen.min()) == out.shape[1]   # every row generated them all (greedy W1): no mask to apply
        flat = out.reshape(-1) if full else out[np.arange(out.shape[1])[None, :] < gen[:, None]].astype(np.int32)
        return lp.attach(Completions(chunk.chunk_id, np.asarray(chunk.rows, np.int64), offs, flat, finish), gen, back)

    @staticmethod
    def done_with(plan):
        """The plan is computed (or failed): its pinned upload buffers may take another chunk."""
        plan.upload.busy = False

    def kv_cache(self, ns, S):
        """The KV cache of ns sequences of S positions: [(keys, values)] per layer, in pool buffer kv."""
        C, L = self.cfg.n_embd, self.cfg.n_layer
        per = ns * S * C * self.model.elt
        kvbase = self.dev.buf("kv", 2 * L * per)
        return [(kvbase + 2 * li * per, kvbase + (2 * li + 1) * per) for li in range(L)]

    def prefill(self, plan, b0, b1, S, kv, heads=False):
        """The forward pass over prompts b0..b1-1 (KV group slots from b0), in passes of whole prompts of at most
        max_prefill_rows tokens: yields (first prompt, end prompt, first row, residual stream, where its prompts'
        last rows are: Model.select's (p_rowidx, idx_base)) a pass. heads: only those rows are needed after the
        last layer (Model.forward's heads), else every row is (score.py)."""
        lay = plan.layout
        for pb0, pb1 in prefill_passes(lay.offsets, b0, b1, self.max_prefill_rows):
            r0, r1 = int(lay.offsets[pb0]), int(lay.offsets[pb1])
            c0, c1 = int(lay.copy_off[pb0]), int(lay.copy_off[pb1])
            last = (plan.p_last + 4 * pb0, r0, pb1 - pb0)
            x, *at = self.model.forward(r1 - r0, plan.p_tok + 4 * r0, plan.p_pos + 4 * r0, plan.p_seq + 4 * r0, b0,
                                        S, kv, tiles=plan.pass_tiles(pb0, pb1),
                                        copies=(plan.p_copies + 12 * c0, c1 - c0), heads=last if heads else None)
            yield pb0, pb1, r0, x, (at if heads else last[:2])

    def _run_group(self, plan, b0, b1, out, gen, finish, lp, last=True):
        drv, dev, model, rp = self.dev.drv, self.dev, self.model, plan.rows
        sampling, lens, mnt = rp.shared, plan.layout.lens, rp.mnt
        ns = b1 - b0
        S = int((lens[b0:b1] + mnt[b0:b1]).max())   # each row's prompt and new tokens
        n_max = int(mnt[b0:b1].max())
        kv = self.kv_cache(ns, S)
        tok_dev, sdev = [dev.buf(name, nbytes) for name, nbytes in decode_buffers(ns)]
        dev.step_buffers(ns, lp.words(ns) if lp.on else 0)
        lp.group(ns)
        ev_p0 = drv.Event()
        ev_p0.record(dev.compute)
        sel = group_sel(self.k, dev, rp, plan.layout, int(plan.upload.dev), b0, b1, model.V)
        kw = {} if sel is None else {"sel": sel}    # None: the job's selection, the call of before
        graphs = self.graphs if self.graphs is not None and not lp.on else None   # (logprobs: buffers move per step)
        # sampling reads each step's number on the GPU (a replay reads its own); gkey: what else its launches bake in
        step_at, gkey = (sdev + 12 * ns, (plan.p_rows, sel, sampling)) if kw or not sampling.greedy else (0, ())
        for pb0, pb1, _, x, at in self.prefill(plan, b0, b1, S, kv, heads=True):
            model.select(x, pb1 - pb0, *at, plan.p_arange + 4 * pb0, plan.p_rows, 0,
                         tok_dev + 4 * (pb0 - b0), sampling, **kw, **lp.kw(ns, pb0 - b0))
        yield Pause(True, READY, int(gen.sum()))   # the prefill runs on the GPU: the next chunk may upload meanwhile
        # Decode. Step s is launched before step s-1's tokens reach the host: its input tokens are step s-1's
        # output, on the GPU, so the GPU never waits for the host between steps. A row that stops (EOS) at step s-1
        # is known only after step s was launched: it computes step s for nothing (dropped here) and leaves the
        # batch from step s+1 on (its next input gathered on the GPU); so does a row at its own max_new_tokens.
        alive = np.ones(ns, bool)           # row b0 + i has not stopped (as far as the host knows)
        lp.download(ns, 0)                  # (before the tokens: their download's event covers it)
        flight = (0, np.arange(b0, b1), dev.download_tokens(tok_dev, ns, 0), ev_p0)   # (step, rows, download, start)
        for step in range(1, n_max + 1):
            nxt = None
            if step < n_max:
                prev_rows = flight[1]
                keep = alive[prev_rows - b0] & (mnt[prev_rows] > step)
                rows = prev_rows[keep]
                n = len(rows)
                if n:
                    # m rows computed: n live ones, then (replayed steps) padding rows (step_rows)
                    m = step_rows(n, ns) if graphs is not None else n
                    sh = dev.step_host[(step % 2) * 3 * ns:][:3 * m]
                    count = step_inputs(sh, lens, rows, keep, step, m, b0, ns)
                    gather = count == 3 * m
                    ev_d0 = drv.Event()
                    ev_d0.record(dev.compute)
                    drv.memcpy_htod_async(sdev, sh[:count], dev.compute)
                    if step_at:
                        dev.upload_step_number(step_at, step)
                    p_tok = tok_dev
                    if gather:
                        p_tok = tok_dev + 4 * ns
                        self.k.gather_tokens(dev.compute, tok_dev, sdev + 8 * m, p_tok, m)
                    if sel is not None and sel.seen:   # the penalty's seen tokens: this step's input ones
                        self.k.mark_seen(dev.compute, p_tok, sdev + 4 * m, n, b0, sel.seen, sel.words)
                    def decode(m=m, p_tok=p_tok, step=step):
                        x, _, _ = model.forward(m, p_tok, sdev, sdev + 4 * m, b0, S, kv)
                        model.select(x, m, None, 0, sdev + 4 * m, plan.p_rows, step, tok_dev, sampling, **kw,
                                     **lp.kw(m), step_at=step_at)
                    if graphs is not None:
                        # the launches depend only on these (the step number is read from step_at)
                        graphs.run((m, p_tok, sdev, tok_dev, b0, S, ns, kv[0][0], *gkey), decode)
                    else:
                        decode()
                    yield Pause(True, READY, int(gen.sum()))
                    lp.download(n, step % 2)
                    nxt = (step, rows, dev.download_tokens(tok_dev, n, step % 2), ev_d0)
            if last and plan.ev_end is None and (nxt is None or step == n_max - 1):   # the chunk's last launch
                plan.ev_end = drv.Event()
                plan.ev_end.record(dev.compute)
                self._start_next()
            # the previous step's tokens reach the host (the step just launched computes meanwhile)
            pstep, prows, (e0, e1, host), start = flight
            yield Pause(submit=False, ready=e1.query, generated=int(gen.sum()))
            e1.synchronize()
            plan.last_down = (e0, e1)
            plan.phases.append(("prefill" if pstep == 0 else "decode", start, e1))
            tok = host[:len(prows)]
            live = alive[prows - b0]                 # rows stopped before pstep computed it for nothing
            lp.take(pstep % 2, len(live), live, prows[live], pstep)
            prows, tok = prows[live], tok[live]
            out[prows, pstep] = tok
            gen[prows] = pstep + 1
            alive[prows[rp.check(prows, tok, finish, out, pstep)] - b0] = False   # stop ids, stop strings
            if nxt is None:
                break
            flight = nxt
