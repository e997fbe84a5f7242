import { makeDevicesBackend } from "../devices-backend.mjs";
export default makeDevicesBackend(import.meta.url, { count: 2 });
