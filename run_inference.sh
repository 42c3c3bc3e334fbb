#!/usr/bin/env bash
# gpt2job launcher: ./run_inference.sh IN OUT.h5 [flags of `python -m gpt2job run`]
# IN: an input HDF5, or a .txt (one prompt per line) or .jsonl file (the master converts it beside OUT.h5).
#
# Started by mpirun (e.g. `mpirun -np 16 --bind-to none --hostfile hostfile ./run_inference.sh IN OUT`): runs
# this rank's part of the job (rank 0 the master, the others workers).
# Started by hand: launches mpirun itself, on the hosts of the hostfile beside this script (or HOSTFILE) if it names
# any other than this machine, else on this machine with one worker per GPU (2 workers without a GPU) plus the master.
# NP=N overrides the number of ranks (at least 2 with a hostfile); PYTHON selects the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "run_inference.sh: error: PYTHON=$python: no such interpreter (fix: give a python3 on every node's PATH" \
        "or a full path, e.g. PYTHON=\$(command -v python3), or leave PYTHON unset for python3)" >&2
    exit 2
fi

# started by an MPI launcher: the same variables as gpt2job/cluster/devices.py MPI_ENV_VARS
if [ -n "${OMPI_COMM_WORLD_SIZE:-}${PMIX_RANK:-}${PMI_RANK:-}${PMI_SIZE:-}${MPI_LOCALNRANKS:-}" ]; then
    trap '' USR1   # (ignored until the master sets its own handler: job.stop_on_sigusr1)
    exec "$python" -m gpt2job run "$@"
fi

if [ "${1:-}" = "--version" ]; then
    exec "$python" -m gpt2job --version
fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then   # the launcher's own part (this file's head), then run's flags
    sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    echo
    exec "$python" -m gpt2job run "$@"
fi
if [ "$#" -lt 2 ]; then
    exec "$python" -m gpt2job run "$@"
fi

if ! command -v mpirun >/dev/null 2>&1; then
    echo "run_inference.sh: error: mpirun not found (fix: install an MPI, e.g. pip install 'gpt2job[mpi]', or load your cluster's MPI module)" >&2
    exit 2
fi

# mpirun's own messages that only repeat what our one line said: the banner after a rank's non-zero exit
# (Open MPI 4 and 5; the exit code is kept), the two after the master (rank 0) ended hung ranks with MPI_Abort, and
# the one after a rank was killed, as one line and PMIx's complaint about the ranks it could not reach after it; and
# libevent's "[warn] Epoll ... Bad file descriptor" that mpirun sometimes prints as its ranks end (seen in CI,
# harmless); "Abort is in progress...hit ctrl-c again" when a signal reached mpirun twice (the group's and ours: our
# line says it)
without_banner() {
    trap '' INT TERM HUP   # keep passing mpirun's last words on until it has gone
    # mawk (Debian's awk) fills its input buffer before it prints a line: -W interactive passes each on as it comes
    local awk=(awk)
    awk -W version 2>/dev/null | grep -qi mawk && awk=(awk -W interactive)
    "${awk[@]}" '
        /^--------------------+$/ {
            if (!open) { open = 1; block = $0 "\n"; next }
            block = block $0 "\n"; open = 0
            one = block; gsub(/\n/, " ", one); gsub(/ +/, " ", one)   # a rank killed (kill -9, the OOM killer): one line
            if (match(one, /process rank [0-9]+ .* exited on signal [0-9]+( \([^)]*\))?/)) {
                print "run_inference.sh: mpirun: " substr(one, RSTART, RLENGTH); fflush(); next
            }
            if (one ~ /MPI_ABORT was invoked on rank 0 |process rank 0 .*calling "abort"/) { gap = 1; next }
            if (block !~ /exited with non-zero status|Primary job +terminated normally/) { printf "%s", block; fflush() }
            next
        }
        open { block = block $0 "\n"; next }
        /PMIX ERROR: PMIX_ERR_UNREACH/ { next }
        /^\[warn\] Epoll [A-Z]+\([0-9]+\) on fd [0-9]+ failed/ { next }
        /[Aa]bort is (already )?in progress.*hit ctrl-c again/ { gap = 1; next }
        gap && /^$/ { gap = 0; next }
        { gap = 0; print; fflush() }
        END { if (open) printf "%s", block }'
}

# mpirun runs in the background of this script's process group: a signal to the script then runs its trap at once
# (bash runs a trap only after a foreground command ends: SIGTERM to the script alone, from `timeout` or `kill`, left
# a foreground mpirun and its ranks running). Ctrl-C, Ctrl-Z and a closed terminal reach the whole group, mpirun
# included, as before; SIGTERM is passed on. Then one line and 130 / 143 / 129. An mpirun still running 10 s after a
# SIGINT or SIGHUP (one sent to this script alone) gets SIGTERM.
mpirun_pid=""
filter_done() {   # the filter has passed every line on (bash before 4.4 cannot wait for it: then it is watched)
    wait "$filter" 2>/dev/null && return
    local i=0
    while kill -0 "$filter" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
}
overwrite=0
for arg in "$@"; do if [ "$arg" = --overwrite ]; then overwrite=1; fi; done
out_arg="${2:-}"
run_args=("$@")   # (the stop line finds OUT among them as gpt2job's parser does: flags may come first)
# what to rerun: --overwrite again would set this run's rows aside; where it kept none (it put back what it had set
# aside) the same command is right
again() {
    if [ "$overwrite" = 0 ]; then echo "run the same command again to resume"
    elif [ -e "$out_arg.replaced" ] || [ -e "$out_arg.journal" ]; then
        echo "run the same command without --overwrite to resume"
    else echo "run the same command again"; fi
}
stop() {   # SIGNAL CODE
    set +e
    trap '' INT TERM HUP USR1
    exec 3>&-
    if [ -n "$mpirun_pid" ]; then
        [ "$1" = TERM ] && kill -s TERM "$mpirun_pid" 2>/dev/null
        local i=0
        while kill -0 "$mpirun_pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        kill -s TERM "$mpirun_pid" 2>/dev/null
        wait "$mpirun_pid"
    fi
    filter_done   # mpirun's last words, before ours
    local what=interrupted; [ "$1" != INT ] && what="terminated (SIG$1)"
    # OUT as gpt2job's parser finds it, and gpt2job's own account of it (a finished output, rows kept, or none); with
    # --overwrite once no rank holds OUT's lock (mpirun may end first: the master may still be putting OUT back)
    local found="" tail=""
    { IFS= read -r found; IFS= read -r tail; } < <("$python" -c 'import sys, time; from gpt2job.cli import build_parser
from gpt2job.files import outpaths; from gpt2job.cluster.trace import launch_time
a = build_parser().parse_args(["run", *sys.argv[1:]]); print(a.output, flush=True)
t = time.monotonic() + 5
while a.overwrite and outpaths.being_written(a.output) and time.monotonic() < t: time.sleep(0.1)
print(outpaths.after_stop(a.output, a.overwrite, launch_time()))' \
        "${run_args[@]}" 2>/dev/null)
    [ -n "$tail" ] && out_arg=$found || tail="; completed rows are kept: $(again)"
    if [ "$overwrite" = 1 ] && [ -e "$out_arg.replaced" ]; then
        echo "run_inference.sh: the output this run replaces stays in $out_arg.replaced" >&2 2>/dev/null
    fi
    echo "run_inference.sh: $what$tail" >&2 2>/dev/null
    exit "$2"
}

usr1() {   # SIGUSR1 (a batch system's warning ahead of its time limit): the master hands out no more chunks and ends
    # the job once those out are done (exit 5). To mpirun (Open MPI 5 passes it on to every rank; 4.1 does not) and to
    # the ranks mpirun started on this node (the master among them: it runs on the first host)
    [ -n "$mpirun_pid" ] || return 0
    kill -s USR1 "$mpirun_pid" 2>/dev/null
    pkill -USR1 -P "$mpirun_pid" -f -- "-m gpt2job (run|score) " 2>/dev/null
    return 0
}

launch() {   # mpirun ARGS...: its stdout as is, its stderr without the banner; exits with mpirun's code
    exec 3> >(trap '' USR1; without_banner >&2)   # (USR1 to the group: the ranks' to act on)
    filter=$!
    trap 'stop INT 130' INT
    trap 'stop TERM 143' TERM
    trap 'stop HUP 129' HUP
    trap usr1 USR1
    set +e
    # (a subshell that execs: a background command would start with SIGINT ignored, and Ctrl-C would not reach it)
    ( trap - INT QUIT USR1; exec mpirun "$@" 2>&3 3>&- </dev/null ) &
    mpirun_pid=$!
    exec 3>&-
    local code
    while :; do   # (a trapped USR1 ends a wait early: wait again while mpirun runs)
        wait "$mpirun_pid"
        code=$?
        [ "$code" -gt 128 ] && kill -0 "$mpirun_pid" 2>/dev/null || break
    done
    if [ "$code" -gt 128 ]; then   # (mpirun ended while the trap ran: its status, kept by bash; 127: none kept)
        wait "$mpirun_pid"
        local c=$?
        [ "$c" = 127 ] || code=$c
    fi
    filter_done
    exit "$code"
}

if [ -n "${NP:-}" ] && ! [[ "$NP" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_inference.sh: error: NP=$NP: must be a number of ranks >= 1 (fix: e.g. NP=3 for the master and" \
        "2 workers, or leave NP unset: one worker per GPU)" >&2
    exit 2
fi

export GPT2JOB_LAUNCH_TIME="$("$python" -c 'import time; print(time.time())')"
if [ "$(id -u)" = "0" ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

hostfile="${HOSTFILE:-$here/hostfile}"
if [ -n "${HOSTFILE:-}" ] && [ ! -f "$HOSTFILE" ]; then
    echo "run_inference.sh: error: HOSTFILE=$HOSTFILE: no such file (fix: give a hostfile, or leave HOSTFILE unset" \
        "for the hostfile beside run_inference.sh)" >&2
    exit 2
fi
me="$(hostname)"; me_short="$(hostname -s 2>/dev/null || echo "$me")"
remote_hosts=""
if [ -f "$hostfile" ]; then
    remote_hosts="$(grep -v '^[[:space:]]*#' "$hostfile" \
        | awk 'NF {if (gsub(/:/, ":", $1) == 1) sub(/:[0-9]+$/, "", $1); print $1}' \
        | grep -v -x -e localhost -e 127.0.0.1 -e "$me" -e "$me_short" || true)"
fi

if [ -n "$remote_hosts" ] && command -v getent >/dev/null 2>&1; then
    # a host name that cannot be resolved: ssh (mpirun's launcher) fails on it after mpirun's banner (exit 255); said
    # here in one line. Not where ssh's own config reaches the host otherwise (an alias to another name, a proxy)
    for h in $remote_hosts; do
        name="$h"; proxied=""
        if command -v ssh >/dev/null 2>&1; then
            cfg="$(ssh -G "$h" 2>/dev/null || true)"
            name="$(awk '$1 == "hostname" {print $2; exit}' <<< "$cfg")"; name="${name:-$h}"
            proxied="$(awk '($1 == "proxyjump" || $1 == "proxycommand") && $2 != "none" {print 1; exit}' <<< "$cfg")"
        fi
        # (an address needs no lookup: getent looks an IP up in reverse, which fails where no name is recorded)
        [[ "$name" =~ ^[0-9]+(\.[0-9]+){3}$ || "$name" == *:*:* ]] && continue
        if [ -z "$proxied" ] && ! getent hosts "$name" >/dev/null 2>&1; then
            echo "run_inference.sh: error: $hostfile: host $h: no such host (its name does not resolve) (fix: correct" \
                "the host names in $hostfile, or give HOSTFILE=FILE)" >&2
            exit 2
        fi
    done
fi
if [ -n "$remote_hosts" ]; then
    # each host's ranks: Open MPI's "HOST slots=N" or MPICH's "HOST:N" (HOST without a colon: an IPv6 address has
    # several); a host with neither is refused (mpirun's own default for it differs by MPI and version)
    no_slots="$(grep -v -e '^[[:space:]]*#' -e '[[:space:]]slots=[0-9]' -e '^[[:space:]]*[^[:space:]:]*:[0-9]' \
        "$hostfile" | awk 'NF {print $1; exit}' || true)"
    if [ -z "${NP:-}" ] && [ -n "$no_slots" ]; then
        echo "run_inference.sh: error: $hostfile: host $no_slots has no count of ranks, so they cannot be counted" \
            "(fix: set NP, or write '$no_slots slots=N' (Open MPI; N its GPUs, plus 1 on the master's node))" >&2
        exit 2
    fi
    slots="$(grep -v '^[[:space:]]*#' "$hostfile" | sed -n -e 's/.*[[:space:]]slots=\([0-9]*\).*/\1/p' \
        -e 's/^[[:space:]]*[^[:space:]:]*:\([0-9]*\).*/\1/p' | awk '{s+=$1} END {print s+0}')"
    np="${NP:-$slots}"
    [ "$np" -ge 2 ] || np=2
    launch -np "$np" --hostfile "$hostfile" --bind-to none "$here/run_inference.sh" "$@"
fi

ngpu=0
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    ngpu="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c -v -e '^$' -e '^-1$' || true)"
else
    ngpu="$(ls /dev 2>/dev/null | grep -c -E '^nvidia[0-9]+$' || true)"
fi
workers=$(( ngpu > 0 ? ngpu : 2 ))
np="${NP:-$(( workers + 1 ))}"
# Open MPI 4 starts even a one-machine job through ssh/rsh and stops where neither is installed (containers:
# "plm_rsh_agent: ssh : rsh ... could not be found"); its "isolated" launcher starts local ranks without them (Open
# MPI 5 needs neither and ignores the setting). Not inside a batch allocation, whose own launcher mpirun picks.
if ! command -v ssh >/dev/null 2>&1 && ! command -v rsh >/dev/null 2>&1 \
    && [ -z "${OMPI_MCA_plm:-}${OMPI_MCA_plm_rsh_agent:-}${SLURM_JOB_ID:-}${PBS_JOBID:-}${LSB_JOBID:-}" ]; then
    export OMPI_MCA_plm=isolated
fi
# --bind-to none: Open MPI 4 binds each rank of a job of 2 ranks to one core (its default up to 2 ranks), where the
# worker's threads and a cold node's kernel compiles (8 at once) then share that core
launch -np "$np" --oversubscribe --bind-to none "$here/run_inference.sh" "$@"
