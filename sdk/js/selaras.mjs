// ES module entry: `import Selaras from "./selaras.mjs"`. The code lives in selaras.js (one copy for both
// ways of loading); importing it runs it once and it defines globalThis.Selaras.
import "./selaras.js";

const Selaras = globalThis.Selaras;
export default Selaras;
export const { init, consent, track, flush, recommend, render, visitorId, version } = Selaras;
