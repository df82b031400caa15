/** The oneDNN addon's start-up checks: what a host cannot run, and the fix named for each dlopen failure. */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { loadOneDnnKernels, missingCpuFlags, oneDnnLoadFix, X86_64_V2_FLAGS } from '../../shared/engine/onednn-kernels.ts';

describe('oneDNN addon start-up checks', () => {
  it('names the x86-64-v2 flags a CPU lacks', () => {
    const v2 = `processor\t: 0\nflags\t\t: fpu sse2 ${X86_64_V2_FLAGS.join(' ')} avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n`;
    expect(missingCpuFlags(v2)).toEqual([]);
    expect(missingCpuFlags('processor\t: 0\nflags\t\t: fpu sse2 ssse3 cx16 lahf_lm\n')).toEqual(['popcnt', 'sse4_1', 'sse4_2']);
    expect(missingCpuFlags('no flags line here')).toEqual([]);
  });

  it('gives each kind of load failure its own fix', () => {
    expect(oneDnnLoadFix('libdnnl.so.2: cannot open shared object file: No such file or directory')).toMatch(/apt-get install -y libdnnl2/);
    expect(oneDnnLoadFix("The module '/x/medfl_onednn.node' was compiled against a different Node.js version using NODE_MODULE_VERSION 108")).toMatch(/Node 20 and rebuild/);
    expect(oneDnnLoadFix('/x/medfl_onednn.node: wrong ELF class: ELFCLASS32')).toMatch(/another CPU architecture/);
    expect(oneDnnLoadFix('/x/medfl_onednn.node: undefined symbol: dnnl_memory_create')).toMatch(/another oneDNN version/);
    expect(oneDnnLoadFix('something else')).toMatch(/^rebuild it: .*npm run build:native/);
  });

  it('loads the addon on this host (built by npm ci), whose CPU has the flags', () => {
    if (process.platform === 'linux' && process.arch === 'x64') expect(missingCpuFlags(readFileSync('/proc/cpuinfo', 'utf8'))).toEqual([]);
    const r = loadOneDnnKernels();
    expect('reason' in r ? r.reason : 'loaded').toBe('loaded');
  });
});
