import { makeDevicesBackend } from "../devices-backend.mjs";
export default makeDevicesBackend(import.meta.url, { api: 3 });
