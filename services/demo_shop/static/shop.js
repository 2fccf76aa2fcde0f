// The demo shop's pages: what a shop writes around the Selaras browser SDK (sdk/js/). No framework and no build
// step; every value from the catalog is inserted as text, never as HTML. The home and cart pages load the SDK with
// a script tag; the product page imports it as an ES module (product.mjs) and calls DemoShop.productPage.
"use strict";

(function (root) {
  const config = root.SELARAS_SHOP; // assets/config.js: the profile service's URL and the public browser key
  const CART_KEY = "demo_shop_cart";
  const ITEMS_KEY = "demo_shop_items";
  const HOME_SLOT = "home_products"; // the slot of the demo experiment (experiments.yaml)

  function read(storage, key, fallback) {
    try { return JSON.parse(root[storage].getItem(key)) || fallback; } catch (e) { return fallback; }
  }

  function write(storage, key, value) {
    try { root[storage].setItem(key, JSON.stringify(value)); } catch (e) { /* blocked storage */ }
  }

  function status(text) {
    document.getElementById("status").textContent = text;
  }

  function init(Selaras) {
    // The recommend service is this page's own origin; events go to the profile service (CORS).
    Selaras.init({ endpoint: { profile: config.endpoint.profile, recommend: root.location.origin }, key: config.key });
    showCartCount();
  }

  // A real shop renders its product pages from its own catalog. This demo has no server of its own, so it keeps
  // the cards the recommend service sent (title, price, category) for the product page that follows a click.
  function remember(items) {
    const known = read("sessionStorage", ITEMS_KEY, {});
    items.forEach(function (item) {
      known[item.item_id] = { item_id: item.item_id, title: item.title, price: item.price,
        category: item.category, brand: item.brand };
    });
    write("sessionStorage", ITEMS_KEY, known);
  }

  function known(itemId) {
    return read("sessionStorage", ITEMS_KEY, {})[itemId] || null;
  }

  function rupiah(price) {
    return price === null || price === undefined ? "" : "Rp" + Math.round(price).toLocaleString("id-ID");
  }

  function picture(category) {
    // The demo catalog's image URLs point nowhere: a coloured tile with the category's initial stands in.
    const tile = document.createElement("span");
    tile.className = "picture";
    let hash = 0;
    for (const ch of String(category || "?")) hash = (hash * 31 + ch.charCodeAt(0)) % 360;
    tile.dataset.hue = String(Math.floor(hash / 30)); // 12 colours in shop.css
    tile.textContent = String(category || "?").slice(0, 1).toUpperCase();
    return tile;
  }

  // The template the SDK calls for every item of a slot: a link to this shop's product page.
  function card(item) {
    const link = document.createElement("a");
    link.className = "card";
    link.href = "product.html?item=" + encodeURIComponent(item.item_id);
    link.appendChild(picture(item.category));
    const title = document.createElement("span");
    title.className = "selaras-title";
    title.textContent = item.title;
    link.appendChild(title);
    const price = document.createElement("span");
    price.className = "selaras-price";
    price.textContent = rupiah(item.price);
    link.appendChild(price);
    return link;
  }

  function showSlot(Selaras, answer, slotName, element) {
    const slot = answer.slots.find(function (s) { return s.name === slotName; });
    remember(slot ? slot.items : []);
    return Selaras.render(slotName, element, card);
  }

  function cart() { return read("localStorage", CART_KEY, []); }

  function showCartCount() {
    const count = cart().reduce(function (n, line) { return n + line.quantity; }, 0);
    const badge = document.getElementById("cart-count");
    if (badge) badge.textContent = String(count);
  }

  function homePage(Selaras) {
    init(Selaras);
    Selaras.track("page_view", { page: "home" });
    const element = document.getElementById("home");
    Selaras.recommend([{ name: HOME_SLOT, count: 8 }], { page: "home" })
      .then(function (answer) { return showSlot(Selaras, answer, HOME_SLOT, element); })
      .then(function (slot) { status("rendered " + slot.items.length); })
      .catch(function (error) { status("error " + error.message); });
  }

  function productPage(Selaras) {
    init(Selaras);
    const itemId = new URLSearchParams(root.location.search).get("item") || "";
    const item = known(itemId) || { item_id: itemId, title: "Produk " + itemId, price: null, category: "" };
    document.title = item.title + " · Toko Demo Selaras";
    document.getElementById("product-title").textContent = item.title;
    document.getElementById("product-meta").textContent = [item.category, item.brand].filter(Boolean).join(" · ");
    document.getElementById("product-price").textContent = rupiah(item.price);
    document.getElementById("product-picture").replaceChildren(picture(item.category));
    // The SDK adds the recommendation id of the slot this item was clicked in (attribution).
    Selaras.track("product_view", { item_id: itemId, price: item.price === null ? undefined : item.price });
    status("viewed " + itemId + " as " + Selaras.visitorId());
    document.getElementById("add-to-cart").addEventListener("click", function () {
      const lines = cart();
      const line = lines.find(function (l) { return l.item_id === itemId; });
      if (line) line.quantity += 1;
      else lines.push({ item_id: itemId, title: item.title, price: item.price, category: item.category, quantity: 1 });
      write("localStorage", CART_KEY, lines);
      Selaras.track("add_to_cart", { item_id: itemId, quantity: 1, price: item.price === null ? undefined : item.price });
      document.getElementById("added").hidden = false;
      showCartCount();
    });
    // The item-to-item slot: neighbours of this item (never the item itself), re-ranked for a known visitor.
    const slot = { name: "similar_items", strategy: "similar", count: 6 };
    Selaras.recommend([slot], { page: "product", item_ids: [itemId] })
      .then(function (answer) { return showSlot(Selaras, answer, slot.name, document.getElementById("similar")); })
      .catch(function (error) { document.getElementById("similar").textContent = error.message; });
  }

  function cartPage(Selaras) {
    init(Selaras);
    Selaras.track("page_view", { page: "cart" });
    const list = document.getElementById("cart-lines");
    function draw() {
      const lines = cart();
      document.getElementById("cart-empty").hidden = lines.length > 0;
      list.replaceChildren.apply(list, lines.map(function (line) {
        const row = document.createElement("li");
        row.dataset.item = line.item_id;
        const name = document.createElement("a");
        name.href = "product.html?item=" + encodeURIComponent(line.item_id);
        name.textContent = line.title;
        const amount = document.createElement("span");
        amount.textContent = line.quantity + " × " + rupiah(line.price);
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "Hapus";
        remove.addEventListener("click", function () {
          write("localStorage", CART_KEY, cart().filter(function (l) { return l.item_id !== line.item_id; }));
          Selaras.track("remove_from_cart", { item_id: line.item_id, quantity: line.quantity });
          draw();
          showCartCount();
        });
        row.append(name, amount, remove);
        return row;
      }));
    }
    draw();
    const anchors = cart().map(function (line) { return line.item_id; }).slice(0, 20);
    // Bought together with what is in the cart; an empty cart gets the visitor's own picks.
    const slot = anchors.length
      ? { name: "cart_together", strategy: "bought_together", count: 6 }
      : { name: "cart_products", count: 6 };
    Selaras.recommend([slot], { page: "cart", item_ids: anchors })
      .then(function (answer) { return showSlot(Selaras, answer, slot.name, document.getElementById("together")); })
      .then(function (shown) { status("rendered " + shown.items.length); })
      .catch(function (error) { status("error " + error.message); });
  }

  root.DemoShop = { productPage: productPage };
  const page = document.body.dataset.page;
  if (page === "home") homePage(root.Selaras);
  else if (page === "cart") cartPage(root.Selaras);
})(globalThis);
