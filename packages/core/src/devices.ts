// Rank placement: which device of the backend each rank runs on. Checked before any worker
// starts and before any weight is read, so a bad placement costs nothing.
import { BackendError, type BackendProvider, type DeviceInfo } from "./backend.js";

export interface PlacementOptions {
  /** device index (into the provider's `devices()`) per rank; default: rank r on device r */
  devices?: readonly number[];
  /**
   * allow ranks to share a device (testing on a machine with one accelerator); device
   * collectives are then off and the ranks meet in the host collective
   */
  shareDevices?: boolean;
}

export interface Placement {
  /** device index per rank */
  devices: number[];
  /** the devices, per rank */
  info: DeviceInfo[];
  /** false with shareDevices: collectives go through the host */
  deviceCollectives: boolean;
}

/** Parse `--devices 0,1,2,3` (or "0 1 2 3"). */
export function parseDeviceList(s: string): number[] {
  const parts = s.split(/[\s,]+/).filter((x) => x !== "");
  if (!parts.length) throw new Error(`--devices: expected a comma-separated list of device indices, got "${s}"`);
  return parts.map((x) => {
    if (!/^\d+$/.test(x)) throw new Error(`--devices: "${x}" is not a device index (a non-negative integer) in "${s}"`);
    return Number(x);
  });
}

/** Place `worldSize` ranks on the devices of `provider`, or a clear error naming the problem. */
export function placeRanks(provider: BackendProvider, worldSize: number, opts: PlacementOptions = {}): Placement {
  const all = provider.devices();
  const name = provider.name;
  const list = all.map((d) => `${d.index}: ${d.name}`).join("; ");
  if (!all.length) throw new BackendError(`backend "${name}" has no devices to place ranks on`);
  const share = opts.shareDevices === true;
  let devices: number[];
  if (opts.devices) {
    devices = [...opts.devices];
    if (devices.length !== worldSize)
      throw new BackendError(`${devices.length} device${devices.length === 1 ? "" : "s"} given (${devices.join(",")}) for ${worldSize} rank${worldSize === 1 ? "" : "s"}: give one device per rank`);
    for (const d of devices)
      if (!Number.isInteger(d) || !all.some((x) => x.index === d)) throw new BackendError(`device ${d} does not exist on backend "${name}" (its devices: ${list})`);
  } else if (all.length === 1 && all[0]!.shareable) {
    devices = new Array<number>(worldSize).fill(all[0]!.index);
  } else {
    if (worldSize > all.length && !share)
      throw new BackendError(
        `${worldSize} ranks but backend "${name}" has ${all.length} device${all.length === 1 ? "" : "s"} (${list}); use fewer ranks, or shareDevices (--share-devices) to put several ranks on one device for testing`,
      );
    devices = Array.from({ length: worldSize }, (_, r) => all[r % all.length]!.index);
  }
  const info = devices.map((d) => all.find((x) => x.index === d)!);
  const seen = new Map<number, number>();
  for (const [r, d] of devices.entries()) {
    const other = seen.get(d);
    if (other !== undefined && !info[r]!.shareable) {
      if (!share) throw new BackendError(`device ${d} is given to rank ${other} and rank ${r}; each rank needs its own device (or shareDevices / --share-devices, for testing)`);
    }
    seen.set(d, r);
  }
  return { devices, info, deviceCollectives: !share };
}
