#!/usr/bin/env bash
# The services the cluster tests need, on this one machine, as root: a single-node SLURM (munged, slurmctld,
# slurmd, and slurmdbd on MariaDB for sacct) and PostgreSQL on 127.0.0.1 with an `mlflow` role and database.
# `start` installs what is missing, configures, starts what is not running and proves each service works; run
# twice, it only checks. `stop` ends them. The tests find them in $SERVICES_ENV (tests/e2e/conftest.py).
# See docs/cluster.md.   usage: bash .ci/services.sh [start|stop|status]
set -euo pipefail

SERVICES_ENV=${HARNESS_SERVICES_ENV:-/var/tmp/harness-test-services.env}
SLURM_CONF=/etc/slurm/slurm.conf
SLURM_STATE=/var/spool/slurmctld
SLURM_SPOOL=/var/spool/slurmd
SLURM_LOG=/var/log/slurm
PG_ROLE=mlflow
PG_PASSWORD=mlflow
PG_DATABASE=mlflow
WAIT_S=${HARNESS_SERVICES_WAIT_S:-60}

say() { echo "[services] $*"; }
die() {
    echo "[services] ERROR: $*" >&2
    exit 1
}

# Start a daemon ("$@"), or fail with the end of its log ($1).
start_daemon() {
    local log=$1
    shift
    "$@" || die "'$*' failed (exit $?); the end of $log: $(tail -n 5 "$log" 2>&1 | tr '\n' ' ')"
}

# Run "$@" until it succeeds (then 0) or $1 seconds pass (then 1).
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# wait_for, or fail naming what was waited for ($2).
wait_or_die() {
    local seconds=$1 what=$2
    shift 2
    wait_for "$seconds" "$@" || die "$what not ready after ${seconds}s (waited for: $*)"
}

apt_updated=0
apt_install() {
    if ((apt_updated == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_missing() {
    local missing=()
    command -v ps >/dev/null || missing+=(procps)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    command -v pg_ctlcluster >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 ||
        missing+=(postgresql)
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# --- munge ---------------------------------------------------------------------------------------------------
start_munge() {
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "starting munged"
        start_daemon /var/log/munge/munged.log runuser -u munge -- /usr/sbin/munged --force
        wait_or_die "$WAIT_S" "munged" bash -c 'munge -n | unmunge'
    fi
}

# --- SLURM ---------------------------------------------------------------------------------------------------
write_slurm_conf() {
    local node host new
    host=$(hostname -s)
    # The node as slurmd sees it (CPUs, sockets, cores, threads, memory), less 512 MB of memory for the system.
    node=$(slurmd -C | head -1)
    local memory=${node##*RealMemory=}
    node="${node% RealMemory=*} RealMemory=$((memory > 1024 ? memory - 512 : memory))"
    new=$(
        cat <<EOF
# Written by .ci/services.sh: a single-node SLURM for the cluster tests (docs/cluster.md).
ClusterName=harness-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
StateSaveLocation=$SLURM_STATE
SlurmdSpoolDir=$SLURM_SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=2
OverTimeLimit=0
Waittime=0
JobRequeue=1
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    )
    install -d -m 0755 /etc/slurm "$SLURM_STATE" "$SLURM_SPOOL" "$SLURM_LOG"
    if [[ -f $SLURM_CONF ]] && [[ "$(cat "$SLURM_CONF")" == "$new" ]]; then
        return 1 # unchanged
    fi
    printf '%s\n' "$new" >"$SLURM_CONF"
    say "wrote $SLURM_CONF"
}

# A process that runs (a zombie, ended but not yet reaped by its parent, does not).
running() { [[ $(ps -o stat= -p "$1" 2>/dev/null) =~ ^[^Z] ]]; }

pid_alive() { [[ -s $1 ]] && running "$(cat "$1")"; }

stop_daemon() {
    local pidfile=$1 pid
    if pid_alive "$pidfile"; then
        pid=$(cat "$pidfile")
        say "stopping $(basename "$pidfile" .pid) ($pid)"
        kill "$pid"
        wait_or_die 30 "exit of process $pid" bash -c "! [[ \$(ps -o stat= -p $pid) =~ ^[^Z] ]]"
    fi
    rm -f "$pidfile"
}

stop_slurm() {
    stop_daemon /run/slurmd.pid
    stop_daemon /run/slurmctld.pid
}

# --- SLURM's accounting: slurmdbd on MariaDB, so that sacct (what submitit polls) knows every job's state ---------
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
start_accounting() {
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    install -d -m 0755 /etc/slurm "$SLURM_LOG"
    if ! mariadb-admin ping >/dev/null 2>&1; then
        say "starting MariaDB"
        /etc/init.d/mariadb start || die "MariaDB did not start (/etc/init.d/mariadb start: exit $?)"
    fi
    wait_or_die "$WAIT_S" "MariaDB" mariadb-admin ping
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    local new
    new=$(
        cat <<EOF
# Written by .ci/services.sh: SLURM's accounting for the cluster tests (docs/cluster.md).
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$SLURM_LOG/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
    )
    if ! [[ -f $SLURMDBD_CONF && "$(cat "$SLURMDBD_CONF")" == "$new" ]]; then
        stop_daemon /run/slurmdbd.pid
        (umask 077 && printf '%s\n' "$new" >"$SLURMDBD_CONF")
        say "wrote $SLURMDBD_CONF"
    fi
    if ! pid_alive /run/slurmdbd.pid; then
        say "starting slurmdbd"
        start_daemon "$SLURM_LOG/slurmdbd.log" slurmdbd
    fi
    wait_or_die "$WAIT_S" "slurmdbd (log: $SLURM_LOG/slurmdbd.log)" sacctmgr -n show cluster
    if [[ -z $(sacctmgr -n -P show cluster format=cluster where cluster=harness-ci) ]]; then
        sacctmgr -i add cluster harness-ci >/dev/null
    fi
}

# The node is up and takes jobs (it may be running some: mixed or allocated).
node_up() { [[ "$(sinfo -h -N -o %T 2>/dev/null)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurm() {
    if ! pid_alive /run/slurmctld.pid; then
        say "starting slurmctld"
        start_daemon "$SLURM_LOG/slurmctld.log" slurmctld -i
    fi
    wait_or_die "$WAIT_S" "slurmctld (log: $SLURM_LOG/slurmctld.log)" scontrol ping
    if ! pid_alive /run/slurmd.pid; then
        say "starting slurmd"
        start_daemon "$SLURM_LOG/slurmd.log" slurmd
    fi
    if ! node_up; then
        # A node left DOWN or DRAIN by an earlier run (e.g. a killed slurmd) returns to service.
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    fi
    wait_for "$WAIT_S" node_up ||
        die "the SLURM node is not up after ${WAIT_S}s: sinfo says '$(sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ' ')'" \
            "(log: $SLURM_LOG/slurmd.log)"
}

# A job with --time=1 --signal=USR1@30 whose step (as in a submitit job) records when USR1 came: slurmctld checks
# time limits and signals every 30 s, so it comes 0 to 30 s after the start (docs/cluster.md). Checked later, by
# check_signal_job, so the wait overlaps PostgreSQL's start.
SIGNAL_LOG=/tmp/harness-services-signal.log
submit_signal_job() {
    local script=/tmp/harness-services-signal-job.sh
    cat >"$script" <<'EOF'
#!/bin/bash
srun bash -c 'start=$SECONDS; trap "echo USR1 after \$((SECONDS - start)) s; exit 0" USR1
    for _ in $(seq 240); do sleep 0.5; done; echo no USR1'
EOF
    rm -f "$SIGNAL_LOG"
    signal_job=$(sbatch --parsable --time=1 --signal=USR1@30 --output="$SIGNAL_LOG" "$script")
}

check_signal_job() {
    wait_for 75 grep -q "USR1 after" "$SIGNAL_LOG" ||
        die "job $signal_job (--time=1 --signal=USR1@30) got no USR1 in 75s: $(cat "$SIGNAL_LOG" 2>&1)"
    say "slurm signals a job before its time limit: job $signal_job, --time=1 --signal=USR1@30: $(grep "USR1 after" "$SIGNAL_LOG")"
}

check_slurm() {
    local out step_job node job
    # shellcheck disable=SC2016 # expanded in the job
    out=$(timeout "$WAIT_S" srun --quiet -N1 -n1 --time=1 bash -c 'echo "$SLURM_JOB_ID $(hostname)"') ||
        die "srun -N1 -n1 hostname failed: $out"
    read -r step_job node <<<"$out"
    [[ $node == "$(hostname)" ]] || die "srun hostname printed '$out', not a job id and $(hostname)"
    wait_or_die 30 "sacct to record srun job $step_job as COMPLETED" \
        bash -c "[[ \$(sacct -n -X -P -j $step_job -o State) == COMPLETED ]]"
    # sbatch, and scontrol requeue of a running job (what preemption tests do).
    job=$(sbatch --parsable --time=1 --output=/dev/null --wrap 'sleep 60')
    wait_or_die 30 "sbatch job $job running" bash -c "[[ \$(squeue -h -j $job -o %T) == RUNNING ]]"
    scontrol requeue "$job"
    wait_or_die 30 "requeued job $job back to PENDING or RUNNING with a restart count" \
        bash -c "[[ \$(scontrol show job $job | grep -o 'Restarts=[0-9]*') == Restarts=1 ]]"
    wait_or_die 30 "sacct to record job $job as REQUEUED" \
        bash -c "[[ \$(sacct -n -X -P -j $job -o State) == REQUEUED ]]"
    scancel "$job"
    wait_or_die 30 "cancelled job $job gone" bash -c "! squeue -h -j $job -o %T | grep -q ."
    say "slurm works: srun job $step_job ran on $node; sbatch job $job ran, was requeued (Restarts=1) and" \
        "cancelled; sacct knows their states"
}

# --- PostgreSQL ----------------------------------------------------------------------------------------------
pg_version() { find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1; }

pg_port() { pg_lsclusters -h | awk -v v="$(pg_version)" '$1 == v && $2 == "main" {print $3}'; }

psql_admin() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$(pg_port)" -d postgres; }

start_postgres() {
    local version
    version=$(pg_version)
    pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q . || pg_createcluster "$version" main
    local conf=/etc/postgresql/$version/main/postgresql.conf
    if ! grep -q "^listen_addresses = '127.0.0.1'" "$conf"; then
        printf "listen_addresses = '127.0.0.1'\n" >>"$conf"
        pg_ctlcluster "$version" main stop >/dev/null 2>&1 || true
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        say "starting PostgreSQL $version"
        start_daemon "/var/log/postgresql/postgresql-$version-main.log" pg_ctlcluster "$version" main start
    fi
    wait_or_die "$WAIT_S" "PostgreSQL $version" runuser -u postgres -- pg_isready -q -h 127.0.0.1 -p "$(pg_port)"
    psql_admin <<EOF
SELECT 'CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD ''$PG_PASSWORD'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE')\gexec
SELECT 'CREATE DATABASE $PG_DATABASE OWNER $PG_ROLE'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DATABASE')\gexec
EOF
    local answer
    answer=$(PGPASSWORD=$PG_PASSWORD psql -X -At -h 127.0.0.1 -p "$(pg_port)" -U "$PG_ROLE" -d "$PG_DATABASE" \
        -c "SELECT current_user || ' ' || current_database() || ' ' || current_setting('server_version')") ||
        die "psql as $PG_ROLE to database $PG_DATABASE on 127.0.0.1 failed"
    say "postgresql works: $answer"
}

stop_postgres() {
    local version
    version=$(pg_version 2>/dev/null) || return 0
    [[ -n $version ]] || return 0
    if pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        say "stopping PostgreSQL $version"
        pg_ctlcluster "$version" main stop
    fi
}

# --- commands ------------------------------------------------------------------------------------------------
start() {
    local began=$SECONDS
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons); you are $(id -un)"
    install_missing
    start_munge
    if write_slurm_conf; then
        stop_slurm # a changed configuration: start afresh
    fi
    start_accounting
    start_slurm
    submit_signal_job
    check_slurm
    start_postgres
    check_signal_job
    cat >"$SERVICES_ENV" <<EOF
HARNESS_TEST_SLURM=1
HARNESS_TEST_POSTGRES_URI=postgresql+psycopg2://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$(pg_port)/$PG_DATABASE
EOF
    say "ready in $((SECONDS - began))s; wrote $SERVICES_ENV"
}

stop() {
    rm -f "$SERVICES_ENV"
    if command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
        scancel --user=root 2>/dev/null || true
    fi
    stop_slurm
    stop_daemon /run/slurmdbd.pid
    if mariadb-admin ping >/dev/null 2>&1; then
        say "stopping MariaDB"
        /etc/init.d/mariadb stop >/dev/null
    fi
    stop_daemon /run/munge/munged.pid
    stop_postgres
}

status() {
    sinfo -N -o '%N %T %c %m' || true
    pg_lsclusters || true
    cat "$SERVICES_ENV" 2>/dev/null || echo "no $SERVICES_ENV"
}

case ${1:-start} in
start | stop | status) "${1:-start}" ;;
*) die "unknown command '${1}'; allowed: start, stop, status" ;;
esac
