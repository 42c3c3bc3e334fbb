"""How an existing output's resume key (model, input, settings: files/output.py) differs from this job's, said as
a user can act on it: the settings by their flags, digests by what they stand for."""
from gpt2job.settings import JobSettings


def _difference(name, was, now, pair=False):
    """One difference of two resume keys, the settings by their flags (--max-new-tokens: was 32, now 64; a setting
    one of them does not record has its default). pair: the keys of an output (was) and the journal beside it
    (now), said as such."""
    a, b = ("the output", "the journal") if pair else ("was", "now")
    said = {"input_fingerprint": ("other prompts", "the input holds other prompts than it was started with"),
            "model_fingerprint": ("other model weights", "the model's weights are not those it was started with")}
    if name in said:   # (two sha256 digests said nothing a reader could act on)
        return said[name][0 if pair else 1]
    if name == "row_settings" and isinstance(was, dict) and isinstance(now, dict):
        if was.get("datasets") != now.get("datasets"):
            return f"per-row settings datasets: {a} {was.get('datasets')}, {b} {now.get('datasets')}"
        if pair:
            return "other values of the per-row settings"
        return (f"the values of the input's per-row settings ({', '.join(map(str, now.get('datasets') or []))}) are "
                "not those it was started with")
    if name == "row_settings":
        return f"per-row settings: {a} {'with' if was else 'without'}, {b} {'with' if now else 'without'}"
    if name == "backend":   # (recorded for --backend synthetic's made-up tokens alone, never a model's backend)
        return f"--backend synthetic: {a} {'yes' if was else 'no'}, {b} {'yes' if now else 'no'}"
    if name != "settings" or not isinstance(was, dict) or not isinstance(now, dict):
        return f"{name}: {a} {was!r}, {b} {now!r}"
    if bool(was.get("score")) != bool(now.get("score")):
        made, this = ("score", "run") if was.get("score") else ("run", "score")
        return f"{a} is of `{made}`, {b} of `{this}`" if pair else f"it is an output of `{made}`, not of `{this}`"
    fields = JobSettings.__dataclass_fields__
    old, new = ({k: d.get(k, fields[k].default if k in fields else None) for k in set(was) | set(now)}
                for d in (was, now))
    return ", ".join(f"--{k.replace('_', '-')}: {a} {old[k]!r}, {b} {new[k]!r}"
                     for k in sorted(old) if old[k] != new[k])


def differing(was, now):
    """The names whose values differ between two resume keys, sorted."""
    return [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]


def differences(was, now, pair=False):
    """What differs between two resume keys, as _difference says it (the first four)."""
    details = [_difference(k, was.get(k), now.get(k), pair) for k in differing(was, now)[:4]]
    return ", ".join([d for d in details if d.startswith("it is an output of")] or details)
