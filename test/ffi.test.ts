// The loader (lib/ffi.ts): the documented errors for a missing library and a wrong ABI version.
// Each case loads in a fresh `bun` child process: the loader caches its result per process.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { ABI_VERSION, BunEpError, Status, check, checkReady } from "../lib/ffi.ts";

const FFI_MODULE = resolve(import.meta.dir, "..", "lib", "ffi.ts");
const BUILT_LIBRARY = resolve(import.meta.dir, "..", "build", "libbun_ep.so");

interface ChildResult {
  ok: boolean;
  message: string;
  availability: { ok: boolean; reason?: string };
}

/** Load the library at `libPath` in a new process; report the error of native() and nativeAvailability(). */
function loadInChild(libPath: string, extra = ""): ChildResult & { extra?: unknown } {
  const code = `
    const ffi = await import(${JSON.stringify(FFI_MODULE)});
    let ok = true, message = "";
    try { ffi.native(); } catch (err) { ok = false; message = err.message; }
    const availability = ffi.nativeAvailability();
    let extra;
    ${extra}
    console.log(JSON.stringify({ ok, message, availability, extra }));
  `;
  const child = Bun.spawnSync([process.execPath, "-e", code], {
    env: { ...process.env, BUN_EP_LIB: libPath },
    stdout: "pipe",
    stderr: "pipe",
  });
  const stdout = child.stdout.toString().trim();
  if (child.exitCode !== 0 || stdout === "") {
    throw new Error(`child bun exited ${child.exitCode}: ${child.stderr.toString()}`);
  }
  return JSON.parse(stdout.split("\n").pop()!);
}

function findCCompiler(): string | null {
  for (const cc of [process.env.CC, "cc", "gcc", "clang"]) {
    if (cc && Bun.which(cc)) return cc;
  }
  return null;
}

const compiler = findCCompiler();
if (compiler === null) console.log("[skip] fake-library loader cases: no C compiler (cc, gcc, clang) found");

/** A shared object made from `source` with `compiler`. */
function compileFakeLibrary(dir: string, name: string, source: string): string {
  const src = join(dir, `${name}.c`);
  const out = join(dir, `${name}.so`);
  writeFileSync(src, source);
  const result = Bun.spawnSync([compiler!, "-shared", "-fPIC", "-o", out, src], { stderr: "pipe" });
  if (result.exitCode !== 0) throw new Error(`${compiler} failed: ${result.stderr.toString()}`);
  return out;
}

describe("loader", () => {
  test("a missing library names the path and how to build it", () => {
    const missing = join(tmpdir(), `bun-ep-missing-${process.pid}`, "libbun_ep.so");
    const result = loadInChild(missing);
    expect(result.ok).toBe(false);
    expect(result.message).toContain(missing);
    expect(result.message).toContain("bunx bun-ep build");
    expect(result.message).toContain("bun run build");
    expect(result.message).toContain("BUN_EP_LIB");
    expect(result.availability).toEqual({ ok: false, reason: result.message });
  });

  test("importing the package's modules does not load the library", () => {
    const code = `
      await import(${JSON.stringify(resolve(import.meta.dir, "..", "lib", "tensor.ts"))});
      await import(${JSON.stringify(resolve(import.meta.dir, "..", "lib", "stream.ts"))});
      await import(${JSON.stringify(resolve(import.meta.dir, "..", "lib", "backend", "cuda_peers.ts"))});
      console.log("imported");
    `;
    const child = Bun.spawnSync([process.execPath, "-e", code], {
      env: { ...process.env, BUN_EP_LIB: "/nonexistent/libbun_ep.so" },
      stderr: "pipe",
    });
    expect(child.stderr.toString()).toBe("");
    expect(child.stdout.toString().trim()).toBe("imported");
  });

  test.skipIf(compiler === null)("a library of another ABI version names both versions and says to rebuild", () => {
    const dir = mkdtempSync(join(tmpdir(), "bun-ep-ffi-"));
    try {
      const wrong = ABI_VERSION + 41;
      const lib = compileFakeLibrary(dir, "wrong_abi", `int bun_ep_abi_version(void) { return ${wrong}; }\n`);
      const result = loadInChild(lib);
      expect(result.ok).toBe(false);
      expect(result.message).toContain(lib);
      expect(result.message).toContain(`ABI version ${wrong}`);
      expect(result.message).toContain(`expects ${ABI_VERSION}`);
      expect(result.message).toContain("rebuild");
      expect(result.availability.ok).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test.skipIf(compiler === null)("a library of the right version that lacks symbols says which and to rebuild", () => {
    const dir = mkdtempSync(join(tmpdir(), "bun-ep-ffi-"));
    try {
      const lib = compileFakeLibrary(dir, "partial", `int bun_ep_abi_version(void) { return ${ABI_VERSION}; }\n`);
      const result = loadInChild(lib);
      expect(result.ok).toBe(false);
      expect(result.message).toContain("lacks a symbol");
      expect(result.message).toContain("rebuild");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a file that is not a shared library gives a load error with the build hint", () => {
    const dir = mkdtempSync(join(tmpdir(), "bun-ep-ffi-"));
    try {
      const bogus = join(dir, "libbun_ep.so");
      writeFileSync(bogus, "not an ELF file");
      const result = loadInChild(bogus);
      expect(result.ok).toBe(false);
      expect(result.message).toContain(bogus);
      expect(result.message).toContain("could not be loaded");
      expect(result.message).toContain("BUN_EP_LIB");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("status checks", () => {
  test("check passes success and throws BunEpError with the status name otherwise", () => {
    expect(() => check(Status.Success, "nothing")).not.toThrow();
    let caught: unknown;
    try {
      check(Status.InvalidArgument, "doing a thing");
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(BunEpError);
    expect((caught as BunEpError).code).toBe("InvalidArgument");
    expect((caught as BunEpError).status).toBe(1);
    expect((caught as BunEpError).message).toContain("doing a thing failed (InvalidArgument)");
  });

  test("checkReady maps NotReady to false", () => {
    expect(checkReady(Status.Success, "q")).toBe(true);
    expect(checkReady(Status.NotReady, "q")).toBe(false);
    expect(() => checkReady(Status.CudaError, "q")).toThrow(BunEpError);
  });

  test("an unknown status still throws, with its number", () => {
    expect(() => check(77, "odd")).toThrow("Unknown 77");
  });
});

// The real library, where it was built: loads without a GPU (it links cudart dynamically), reports
// its features, and its argument checks work before touching the driver.
const builtAvailable = await Bun.file(BUILT_LIBRARY).exists();
if (!builtAvailable) console.log(`[skip] built library cases: ${BUILT_LIBRARY} not built (bun run build)`);

describe.skipIf(!builtAvailable)("built library", () => {
  test("loads, matches the ABI, reports CUDA and explains a rejected argument", () => {
    const result = loadInChild(
      BUILT_LIBRARY,
      `
      const f = ffi.features();
      let error;
      try { ffi.check(ffi.native().bun_ep_debug_write_sequence(0, -1, 0, 0), "write_sequence"); }
      catch (err) { error = { name: err.name, code: err.code, message: err.message }; }
      const name = String(ffi.native().bun_ep_result_name(3));
      extra = { cuda: f.cuda, abi: ffi.native().bun_ep_abi_version(), error, name };
    `,
    );
    expect(result.ok).toBe(true);
    expect(result.availability).toEqual({ ok: true });
    expect(result.extra).toEqual({
      cuda: true,
      abi: ABI_VERSION,
      error: {
        name: "BunEpError",
        code: "InvalidArgument",
        message: "write_sequence failed (InvalidArgument): bun_ep_debug_write_sequence: count must be >= 0, got -1",
      },
      name: "bunEpTimeout",
    });
  });
});
