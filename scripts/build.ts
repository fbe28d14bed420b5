#!/usr/bin/env bun
// Builds build/libbun_ep.so from every cuda/src/*.cu: `bun run build [--arch sm_90] [--check]
// [--verbose] [--jobs N] [--no-nvshmem]`; also run by `bunx bun-ep build`.
// Each .cu compiles to relocatable device code in parallel, cached by a content hash (the source,
// every header under cuda/, the flags and the nvcc version); then a device link and a host link.

import { $, type ProcessOutput } from "zx";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, readdirSync, realpathSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { basename, dirname, join, relative, resolve } from "node:path";

const PACKAGE_ROOT = resolve(import.meta.dir, "..");
const CUDA_DIR = join(PACKAGE_ROOT, "cuda");
const SOURCE_DIR = join(CUDA_DIR, "src");
const BUILD_DIR = join(PACKAGE_ROOT, "build");
const OBJECT_DIR = join(BUILD_DIR, "obj");
const LIBRARY_PATH = join(BUILD_DIR, "libbun_ep.so");

$.quiet = true;

class BuildError extends Error {}

interface Options {
  arch: string;
  check: boolean;
  verbose: boolean;
  jobs: number;
  nvshmem: boolean;
}

const USAGE = `usage: bun scripts/build.ts [--arch sm_90|sm_90a|sm_100a...] [--check] [--verbose] [--jobs N] [--no-nvshmem]
  --arch       GPU architecture (default sm_90, or $BUN_EP_ARCH)
  --check      compile and link only (CI): do not load the library afterwards
  --verbose    print every command
  --jobs N     parallel compilations (default: CPU count)
  --no-nvshmem build without NVSHMEM even where it is found
environment: CUDA_HOME (CUDA toolkit), NVSHMEM_DIR (NVSHMEM with include/ and lib/), BUN_EP_ARCH,
  BUN_EP_NVCC_FLAGS (extra nvcc flags for developer builds, e.g. -DBUN_EP_LL_TRACE)`;

function parseOptions(argv: readonly string[]): Options {
  const options: Options = {
    arch: process.env.BUN_EP_ARCH || "sm_90",
    check: false,
    verbose: false,
    jobs: Math.max(1, availableParallelism()),
    nvshmem: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const [flag, inlineValue] = arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
    const value = (): string => {
      const v = inlineValue ?? argv[++i];
      if (v === undefined) throw new BuildError(`${flag} needs a value\n${USAGE}`);
      return v;
    };
    switch (flag) {
      case "--arch":
        options.arch = value();
        break;
      case "--check":
        options.check = true;
        break;
      case "--verbose":
        options.verbose = true;
        break;
      case "--jobs":
      case "-j": {
        const v = value();
        const jobs = Number(v);
        if (!Number.isInteger(jobs) || jobs < 1) throw new BuildError(`--jobs: expected a positive integer, got ${JSON.stringify(v)}`);
        options.jobs = jobs;
        break;
      }
      case "--no-nvshmem":
        options.nvshmem = false;
        break;
      case "--help":
      case "-h":
        console.log(USAGE);
        process.exit(0);
      default:
        throw new BuildError(`unknown argument ${JSON.stringify(arg)}\n${USAGE}`);
    }
  }
  if (!/^sm_\d{2,3}[af]?$/.test(options.arch)) {
    throw new BuildError(`--arch: expected a CUDA architecture such as sm_90 or sm_90a, got ${JSON.stringify(options.arch)}`);
  }
  return options;
}

// ---- toolchain discovery ---------------------------------------------------------------------------

interface Cuda {
  nvcc: string;
  home: string;
  libDir: string;
  release: string;
  version: string;
}

function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    if (dir !== "" && existsSync(join(dir, name))) return join(dir, name);
  }
  return null;
}

function cudaCandidates(): string[] {
  const candidates: string[] = [];
  for (const env of ["CUDA_HOME", "CUDA_PATH"]) {
    const home = process.env[env];
    if (home) candidates.push(join(home, "bin", "nvcc"));
  }
  const onPath = which("nvcc");
  if (onPath) candidates.push(onPath);
  candidates.push("/usr/local/cuda/bin/nvcc");
  const versioned = existsSync("/usr/local")
    ? readdirSync("/usr/local")
        .filter((d) => /^cuda-\d+(\.\d+)?$/.test(d))
        .sort((a, b) => Number.parseFloat(b.slice(5)) - Number.parseFloat(a.slice(5)))
    : [];
  for (const d of versioned) candidates.push(join("/usr/local", d, "bin", "nvcc"));
  return candidates;
}

async function findCuda(): Promise<Cuda> {
  const fromEnv = process.env.CUDA_HOME;
  if (fromEnv && !existsSync(join(fromEnv, "bin", "nvcc"))) {
    throw new BuildError(`CUDA_HOME=${fromEnv} has no bin/nvcc: point CUDA_HOME at a CUDA toolkit (12.8 or newer)`);
  }
  // A PATH entry may be a symlink or a wrapper script (e.g. /usr/local/bin/nvcc): keep the first
  // candidate that sits in a whole toolkit (bin/nvcc beside a lib dir with libcudart.so).
  let nvcc: string | undefined;
  let home = "";
  let libDir: string | undefined;
  const seen: string[] = [];
  for (const candidate of cudaCandidates()) {
    if (!existsSync(candidate)) continue;
    const real = realpathSync(candidate);
    seen.push(real);
    home = dirname(dirname(real));
    libDir = [join(home, "lib64"), join(home, "targets", "x86_64-linux", "lib"), join(home, "lib")].find((d) =>
      existsSync(join(d, "libcudart.so")),
    );
    if (libDir !== undefined) {
      nvcc = real;
      break;
    }
  }
  if (nvcc === undefined || libDir === undefined) {
    throw new BuildError(
      (seen.length === 0
        ? "nvcc not found (looked in $CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda*)"
        : `no CUDA toolkit with lib64/libcudart.so around nvcc (${seen.join(", ")})`) +
        ": install the CUDA toolkit (12.8 or newer) or set CUDA_HOME to it",
    );
  }
  const out = (await $`${nvcc} --version`).stdout.trim();
  const release = /release (\d+\.\d+)/.exec(out)?.[1] ?? "unknown";
  // The release and the build line: both change the generated code.
  return { nvcc, home, libDir, release, version: `${release} ${out.split("\n").pop() ?? ""}` };
}

interface Nvshmem {
  dir: string;
  from: string;
}

function nvshmemProblem(dir: string): string | null {
  for (const file of ["include/nvshmem.h", "lib/libnvshmem_device.a", "lib/libnvshmem_host.so.3"]) {
    if (!existsSync(join(dir, file))) return `${dir} has no ${file}`;
  }
  return null;
}

async function findNvshmem(options: Options): Promise<Nvshmem | null> {
  if (!options.nvshmem) return null;
  const fromEnv = process.env.NVSHMEM_DIR;
  if (fromEnv) {
    const problem = nvshmemProblem(fromEnv);
    if (problem !== null) {
      throw new BuildError(`NVSHMEM_DIR=${fromEnv}: ${problem}; point it at NVSHMEM 3.x (include/, lib/), or unset it`);
    }
    return { dir: resolve(fromEnv), from: "NVSHMEM_DIR" };
  }
  if (which("python3") === null) return null;
  const located = await $`python3 -c ${"import nvidia.nvshmem as m; print(list(m.__path__)[0])"}`.nothrow();
  const dir = located.exitCode === 0 ? located.stdout.trim() : "";
  if (dir !== "" && nvshmemProblem(dir) === null) return { dir, from: "pip nvidia-nvshmem-cu13" };
  return null;
}

// ---- compile, link ------------------------------------------------------------------------------------

function filesUnder(dir: string, keep: (name: string) => boolean): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...filesUnder(path, keep));
    else if (keep(entry.name)) out.push(path);
  }
  return out.sort();
}

function hashOf(parts: readonly (string | Buffer)[]): string {
  const hash = createHash("sha256");
  for (const part of parts) {
    hash.update(String(part.length));
    hash.update(":");
    hash.update(part);
  }
  return hash.digest("hex").slice(0, 16);
}

interface Job {
  source: string;
  object: string;
  cached: boolean;
}

function planCompile(
  objectDir: string,
  sources: readonly string[],
  compileFlags: readonly string[],
  nvccVersion: string,
): Job[] {
  // A change to any header under cuda/ rebuilds every file: cheaper to be sure than to track includes.
  const headers = filesUnder(CUDA_DIR, (n) => /\.(h|cuh|hpp)$/.test(n));
  const headerParts = headers.flatMap((h) => [relative(CUDA_DIR, h), readFileSync(h)]);
  return sources.map((source) => {
    const stem = basename(source, ".cu");
    const hash = hashOf([readFileSync(source), ...headerParts, compileFlags.join(" "), nvccVersion]);
    const object = join(objectDir, `${stem}-${hash}.o`);
    return { source, object, cached: existsSync(object) };
  });
}

// Objects of older contents, other flags, or deleted sources.
function pruneStaleObjects(objectDir: string, jobs: readonly Job[]): void {
  const keep = new Set(jobs.map((j) => basename(j.object)));
  for (const name of readdirSync(objectDir)) {
    if (/-[0-9a-f]{16}\.o$/.test(name) && !keep.has(name)) rmSync(join(objectDir, name), { force: true });
  }
}

function describeFailure(err: unknown): string {
  const out = err as Partial<ProcessOutput>;
  const text = `${out.stderr ?? ""}${out.stdout ?? ""}`.trim();
  return text !== "" ? text : String(err);
}

async function run(cmd: string, args: readonly string[], verbose: boolean): Promise<void> {
  if (verbose) console.log(`$ ${[cmd, ...args].join(" ")}`);
  await $`${cmd} ${args}`;
}

async function compileAll(jobs: readonly Job[], cuda: Cuda, flags: readonly string[], options: Options): Promise<void> {
  let next = 0;
  let done = 0;
  const failures: string[] = [];
  const total = jobs.length;
  const width = String(total).length;
  const worker = async (): Promise<void> => {
    while (next < jobs.length) {
      const job = jobs[next++]!;
      const name = relative(PACKAGE_ROOT, job.source);
      if (job.cached) {
        done++;
        console.log(`[${String(done).padStart(width)}/${total}] ${name} (cached)`);
        continue;
      }
      const started = performance.now();
      const tmp = `${job.object}.tmp-${process.pid}`;
      try {
        await run(cuda.nvcc, [...flags, "-c", job.source, "-o", tmp], options.verbose);
        renameSync(tmp, job.object);
        done++;
        console.log(`[${String(done).padStart(width)}/${total}] ${name} (${((performance.now() - started) / 1000).toFixed(1)} s)`);
      } catch (err) {
        rmSync(tmp, { force: true });
        done++;
        console.log(`[${String(done).padStart(width)}/${total}] ${name} FAILED`);
        failures.push(`${name}:\n${describeFailure(err)}`);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(options.jobs, Math.max(1, jobs.length)) }, worker));
  if (failures.length > 0) throw new BuildError(`compilation failed:\n\n${failures.join("\n\n")}`);
}

async function link(
  jobs: readonly Job[],
  cuda: Cuda,
  nvshmem: Nvshmem | null,
  options: Options,
): Promise<{ relinked: boolean }> {
  const objects = jobs.map((j) => j.object);
  const nvshmemLib = nvshmem ? join(nvshmem.dir, "lib") : null;
  const deviceLinkArgs = [
    `-arch=${options.arch}`,
    "-dlink",
    "-Xcompiler",
    "-fPIC",
    ...objects,
    ...(nvshmemLib ? [`-L${nvshmemLib}`, "-lnvshmem_device"] : []),
  ];
  const hostLinkArgs = (dlinkObject: string, output: string): string[] => [
    "-shared",
    "-o",
    output,
    ...objects,
    dlinkObject,
    "-Wl,-z,defs",
    ...(nvshmemLib ? [`-L${nvshmemLib}`, "-l:libnvshmem_device.a", "-l:libnvshmem_host.so.3", `-Wl,-rpath,${nvshmemLib}`] : []),
    `-L${cuda.libDir}`,
    "-lcudadevrt",
    "-lcudart",
    `-Wl,-rpath,${cuda.libDir}`,
  ];
  const linkHash = hashOf([...objects, deviceLinkArgs.join(" "), hostLinkArgs("", "").join(" ")]);
  const stampPath = `${LIBRARY_PATH}.hash`;
  if (existsSync(LIBRARY_PATH) && existsSync(stampPath) && readFileSync(stampPath, "utf8") === linkHash) {
    return { relinked: false };
  }
  // Per process: two builds at once (e.g. with and without NVSHMEM) must not share a temporary.
  const dlinkObject = join(OBJECT_DIR, `device_link-${process.pid}.o`);
  const tmpLibrary = `${LIBRARY_PATH}.tmp-${process.pid}`;
  try {
    await run(cuda.nvcc, [...deviceLinkArgs, "-o", dlinkObject], options.verbose);
  } catch (err) {
    rmSync(dlinkObject, { force: true });
    throw new BuildError(`device link failed:\n${describeFailure(err)}`);
  }
  const cxx = process.env.CXX || "g++";
  if (which(cxx) === null && !existsSync(cxx)) throw new BuildError(`${cxx} not found: install g++ (or set CXX) for the host link`);
  try {
    await run(cxx, hostLinkArgs(dlinkObject, tmpLibrary), options.verbose);
  } catch (err) {
    rmSync(tmpLibrary, { force: true });
    rmSync(dlinkObject, { force: true });
    throw new BuildError(`host link failed:\n${describeFailure(err)}`);
  }
  // Replace atomically: a process that has the old library loaded keeps its mapping.
  renameSync(tmpLibrary, LIBRARY_PATH);
  rmSync(dlinkObject, { force: true });
  writeFileSync(stampPath, linkHash);
  return { relinked: true };
}

async function loadTest(): Promise<void> {
  const { dlopen } = await import("bun:ffi");
  const { ABI_VERSION } = await import("../lib/ffi.ts");
  let lib;
  try {
    lib = dlopen(LIBRARY_PATH, {
      bun_ep_abi_version: { args: [], returns: "i32" },
      bun_ep_features: { args: [], returns: "u64" },
    });
  } catch (err) {
    throw new BuildError(`built ${LIBRARY_PATH} but it does not load: ${(err as Error).message}`);
  }
  const version = lib.symbols.bun_ep_abi_version();
  const bits = BigInt(lib.symbols.bun_ep_features());
  lib.close();
  const names = ["cuda", "nvshmem", "intranode", "low-latency", "internode"];
  const present = names.filter((_, i) => (bits & (1n << BigInt(i))) !== 0n);
  console.log(`loaded: ABI version ${version}, features: ${present.join(", ") || "none"}`);
  if (version !== ABI_VERSION) {
    throw new BuildError(
      `the library reports ABI version ${version} but lib/ffi.ts expects ${ABI_VERSION}: ` +
        "BUN_EP_ABI_VERSION in cuda/include/bun_ep.h and ABI_VERSION in lib/ffi.ts must be changed together",
    );
  }
}

async function main(): Promise<void> {
  const options = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const cuda = await findCuda();
  const nvshmem = await findNvshmem(options);
  const sources = existsSync(SOURCE_DIR) ? readdirSync(SOURCE_DIR).filter((n) => n.endsWith(".cu")).sort().map((n) => join(SOURCE_DIR, n)) : [];
  if (sources.length === 0) throw new BuildError(`no .cu files under ${SOURCE_DIR}`);

  console.log(`bun-ep build: ${options.arch}, nvcc ${cuda.release} (${cuda.nvcc}), ${options.jobs} job(s)`);
  if (nvshmem) {
    console.log(`NVSHMEM: ${nvshmem.dir} (from ${nvshmem.from})`);
  } else {
    console.log(
      "NVSHMEM: not used" +
        (options.nvshmem ? " (set NVSHMEM_DIR, or `pip install nvidia-nvshmem-cu13`)" : " (--no-nvshmem)") +
        ": building without the internode kernels and the NVSHMEM low-latency path; " +
        "intranode and peer-pointer low-latency kernels are built",
    );
  }

  const compileFlags = [
    "-O3",
    "-std=c++17",
    "-rdc=true",
    `-arch=${options.arch}`,
    "-lineinfo",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden",
    `-I${join(CUDA_DIR, "include")}`,
    `-I${SOURCE_DIR}`,
    ...(nvshmem ? [`-I${join(nvshmem.dir, "include")}`] : []),
    `-DBUN_EP_WITH_NVSHMEM=${nvshmem ? 1 : 0}`,
    // Developer builds only, e.g. BUN_EP_NVCC_FLAGS=-DBUN_EP_LL_TRACE (README, environment table).
    ...(process.env.BUN_EP_NVCC_FLAGS ?? "").split(/\s+/).filter((f) => f.length > 0),
  ];
  // One object folder per configuration (flags, compiler): switching between configurations (say
  // with and without NVSHMEM) reuses each one's objects instead of rebuilding.
  const objectDir = join(OBJECT_DIR, hashOf([compileFlags.join(" "), cuda.version]));
  mkdirSync(objectDir, { recursive: true });
  const jobs = planCompile(objectDir, sources, compileFlags, cuda.version);
  await compileAll(jobs, cuda, compileFlags, options);
  pruneStaleObjects(objectDir, jobs);
  const { relinked } = await link(jobs, cuda, nvshmem, options);
  const sizeMiB = (statSync(LIBRARY_PATH).size / 2 ** 20).toFixed(1);
  console.log(
    `${relinked ? "linked" : "up to date"}: ${relative(process.cwd(), LIBRARY_PATH) || LIBRARY_PATH} (${sizeMiB} MiB) ` +
      `in ${((performance.now() - started) / 1000).toFixed(1)} s`,
  );
  if (!options.check) await loadTest();
}

try {
  await main();
} catch (err) {
  if (err instanceof BuildError) {
    console.error(`bun-ep build: ${err.message}`);
    process.exit(1);
  }
  throw err;
}
