// The product page loads the SDK as an ES module (what a bundled shop front does); shop.js has run before it.
import Selaras from "./selaras.mjs";

globalThis.DemoShop.productPage(Selaras);
