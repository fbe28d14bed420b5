// bun-ep's public surface: re-exports only. Importing it loads no native code; the CUDA library is
// opened on first use (EpBuffer with backend "cuda"/"auto", DeviceTensor, Stream, ...).

// The buffer: dispatch / combine / low-latency, and its options.
export { EpBuffer, setTunedConfigTable, tunedConfigPath } from "./buffer.ts";
export type {
  BackendChoice,
  CombineOptions,
  DispatchOptions,
  EpBufferOptions,
  LayoutOptions,
  LowLatencyCombineOptions,
  LowLatencyDispatchOptions,
  TunedConfigTable,
} from "./buffer.ts";
export { EpArgumentError } from "./validate.ts";

// Results, handles, configs and the Backend interface (for custom backends).
export type {
  Backend,
  BackendInit,
  CombineArgs,
  CombineResult,
  CommConfig,
  DispatchArgs,
  DispatchHandle,
  DispatchLayout,
  DispatchResult,
  EventLike,
  LowLatencyCombineArgs,
  LowLatencyCombineResult,
  LowLatencyDispatchArgs,
  LowLatencyDispatchResult,
  LowLatencyHandle,
} from "./backend/types.ts";

// Tensors and element types.
export { DeviceTensor, HostTensor, PinnedTensor, numelOf } from "./tensor.ts";
export type { Device, DeviceTensorOptions, Tensor } from "./tensor.ts";
export { DTYPES, DTYPE_BYTES } from "./dtype.ts";
export type { DType, TypedArrayFor } from "./dtype.ts";

// Devices, streams, events, graphs.
export { Event, Graph, Stream, currentDevice, deviceCount, deviceProps, setDevice, streamHandle, withDevice } from "./stream.ts";
export type { DeviceProps, EventOptions, StreamLike, StreamOptions } from "./stream.ts";

// The native library: availability and build features.
export { BunEpError, features, nativeAvailability } from "./ffi.ts";
export type { Features } from "./ffi.ts";

// Rank groups and the launcher.
export { GroupError, LocalGroup, TcpGroup, initGroupFromEnv, readEnvLayout } from "./group.ts";
export type { EnvGroupOptions, EnvLayout, Group, LocalGroupOptions, TcpGroupOptions } from "./group.ts";
export { findFreePort, launch } from "./launch.ts";
export type { LaunchOptions, LaunchResult, RankExit } from "./launch.ts";

// The executable spec (also at "bun-ep/reference") and exact conversions.
export * from "./reference.ts";
export * from "./convert.ts";
