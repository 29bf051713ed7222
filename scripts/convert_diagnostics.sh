#!/usr/bin/env bash
# Where convert's time goes on a machine: convert vs cp under /usr/bin/time, the single-stream ceilings (sha256,
# buffered write from one thread) and per-thread CPU of one conversion (16-layer Qwen3-30B-shaped example, 6.86 GB).
# Usage on the device machine, from the repo root, with .whl carried:  bash scripts/convert_diagnostics.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .devsite .whl/*.whl
export PYTHONPATH=$PWD/.devsite:$PWD
W=/tmp/dg; mkdir -p $W
python3 -m nvfp4ckpt example $W/src --shape qwen3-30b-a3b --layers 16 --max-shard-size 2GB -q
cat $W/src/* > /dev/null
nproc; lscpu | grep -i "model name\|sha_ni\|Flags" | cut -c1-80 | head -3; grep -o sha_ni /proc/cpuinfo | head -1
df -h /tmp | tail -1; mount | grep " /tmp \| / " | head -2
for i in 1 2; do rm -rf $W/o; /usr/bin/time -f "convert: %e s wall, %U user, %S sys, minflt %R" python3 -m nvfp4ckpt convert $W/src $W/o -q; done
rm -rf $W/c; /usr/bin/time -f "cp+sync: %e s wall, %U user, %S sys" sh -c "cp -r $W/src $W/c && sync"
/usr/bin/time -f "sha256sum of out (warm): %e s" sha256sum $W/o/model.safetensors
python3 -c "
import hashlib,time,os
b=bytearray(os.urandom(64<<20))*4
t=time.perf_counter(); h=hashlib.sha256(); [h.update(b) for _ in range(8)]; dt=time.perf_counter()-t
print(f'hashlib sha256: {8*len(b)/dt/1e9:.2f} GB/s')
import numpy as np
a=np.empty(256<<20,np.uint8); a[:]=1
fd=os.open('$W/w.bin',os.O_WRONLY|os.O_CREAT|os.O_TRUNC); t=time.perf_counter()
for _ in range(16): os.write(fd, memoryview(a))
dt=time.perf_counter()-t; print(f'buffered write 4 GiB from one thread: {16*a.nbytes/dt/1e9:.2f} GB/s (no fsync)')
t=time.perf_counter(); os.fsync(fd); print(f'fsync after: {time.perf_counter()-t:.2f} s'); os.close(fd)
"
rm -rf $W/c $W/w.bin
python3 - <<'PY'
# where the convert's threads spend their time: per-thread CPU via /proc at the end of a run
import subprocess, sys, time, threading, os, shutil
shutil.rmtree('/tmp/dg/o', ignore_errors=True)
code = '''
import os, time, threading, sys
from nvfp4ckpt.convert import convert_checkpoint
t=time.perf_counter()
stats={}
def sample():
    while True:
        for tid in os.listdir('/proc/self/task'):
            try:
                f=open(f'/proc/self/task/{tid}/stat').read(); name=open(f'/proc/self/task/{tid}/comm').read().strip()
            except OSError: continue
            p=f.rsplit(')',1)[1].split(); stats[tid]=(name,int(p[11])/100,int(p[12])/100)
        time.sleep(0.05)
threading.Thread(target=sample,daemon=True).start()
convert_checkpoint('/tmp/dg/src','/tmp/dg/o')
print(f'wall {time.perf_counter()-t:.2f} s')
for tid,(n,u,s) in sorted(stats.items(), key=lambda x:-(x[1][1]+x[1][2])):
    if u+s>0.05: print(f'  {n:20s} user {u:5.2f} sys {s:5.2f}')
'''
print(subprocess.run([sys.executable,'-c',code],capture_output=True,text=True).stdout)
PY
