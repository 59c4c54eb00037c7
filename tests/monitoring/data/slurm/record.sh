#!/bin/bash
# Records what labkit-slurm-exporter reads, from a real Slurm, into directory $1 (see README.md).
# The command lines are the exporter's own (labkit_exporters/slurm.py COMMANDS); the unit test checks
# that each recorded <binary>.argv still equals them.
set -u
out=${1:?usage: record.sh OUTPUT_DIR}
mkdir -p "$out"
record() {
    local name=$1; shift
    printf '%s\n' "$@" > "$out/$name.argv"
    timeout 20 "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
    echo $? > "$out/$name.rc"
}
record sinfo sinfo -h -N -O 'NodeList:|,Partition:|,StateLong:|,Gres:|,GresUsed:|,Reason:|'
record squeue squeue -h -a -r -O 'UserName:|,Account:|,Partition:|,State:|,tres-alloc:|,Reason:|'
record sdiag sdiag
record sshare sshare -a -P -n -o Account,User,RawShares,NormShares,RawUsage,EffectvUsage,FairShare
record scontrol scontrol ping
record sacctmgr sacctmgr -n -P show cluster format=Cluster
