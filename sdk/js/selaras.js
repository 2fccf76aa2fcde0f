/*
 * Selaras browser SDK: track behaviour, fetch recommendations, render slots, report clicks.
 *
 * One plain file, no build step, no dependencies. Include it with a <script> tag (it defines
 * `window.Selaras`) or import `selaras.mjs`, which loads this file and re-exports the same object.
 *
 * The key given to `init` is a public browser key: it holds the `recommend` and `collect` scopes only.
 * With it the SDK can send behaviour events of its own visitor (views, searches, carts, clicks) and ask for
 * rankings; it can never read a profile, record a purchase or change consent: those stay on the shop's
 * server with a secret key. Answers to a browser key carry no personal data.
 */
(function (root) {
  "use strict";

  var VERSION = "0.1.0";
  var STORAGE_KEY = "selaras_vid";
  var SESSION_KEY = "selaras_sid";
  var ATTRIBUTION_KEY = "selaras_attribution";
  var CLOCK_KEY = "selaras_clock_offset";
  // What a `collect` key may send (services/common/events.py BROWSER_EVENT_TYPES). Refused here, before a
  // request, so a mistake shows in the console instead of as a 403 for the whole batch.
  var BROWSER_EVENT_TYPES = [
    "page_view", "product_view", "search", "add_to_cart", "remove_from_cart", "click", "dismiss",
  ];
  var EVENT_FIELDS = ["item_id", "quantity", "price", "query", "recommendation_id"];
  // Events about an item that should carry the id of the recommendation the visitor came from.
  var ATTRIBUTED_TYPES = ["product_view", "add_to_cart", "remove_from_cart", "click", "dismiss"];
  var MAX_BATCH = 50; // well under the service's 1,000 and the 64 KiB a keepalive request may carry

  var config = null;
  var queue = [];
  var timer = null;
  var consented = true;
  var slots = {}; // slot name -> {recommendation_id, slot} of the latest answer on this page
  var listening = false;
  // The service clock minus this browser's, learned from the `time` of recommend answers. Visitors' clocks
  // are often minutes off, and the profile service refuses a batch with events dated in its future.
  var clockOffsetMs = 0;

  function randomId() {
    if (root.crypto && typeof root.crypto.randomUUID === "function") return root.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    root.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  function readStorage(storage, key) {
    try { return root[storage].getItem(key); } catch (e) { return null; } // blocked storage (privacy modes)
  }

  function writeStorage(storage, key, value) {
    try { root[storage].setItem(key, value); return true; } catch (e) { return false; }
  }

  function readCookie(name) {
    var match = root.document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : null;
  }

  // A pseudonymous id, kept in localStorage and a first-party cookie (whichever survives): it names a browser,
  // never a person. The shop links it to a customer on its server, with its secret key, if it wants to.
  function storedVisitorId() {
    return readStorage("localStorage", STORAGE_KEY) || readCookie(STORAGE_KEY);
  }

  function keepVisitorId(id, days) {
    if (days > 0) writeStorage("localStorage", STORAGE_KEY, id);
    else try { root.localStorage.removeItem(STORAGE_KEY); } catch (e) { /* blocked storage */ }
    var secure = root.location.protocol === "https:" ? "; Secure" : "";
    root.document.cookie = STORAGE_KEY + "=" + encodeURIComponent(id) + "; path=/; max-age=" + days * 86400 +
      "; SameSite=Lax" + secure;
  }

  function sessionId() {
    var id = readStorage("sessionStorage", SESSION_KEY);
    if (!id) {
      id = randomId();
      writeStorage("sessionStorage", SESSION_KEY, id);
    }
    return id;
  }

  // item id -> recommendation id of the slot it was clicked in, for the rest of the browser session: the
  // product page and the cart that follow a click echo it, so experiments attribute them to what was shown.
  function attribution() {
    try { return JSON.parse(readStorage("sessionStorage", ATTRIBUTION_KEY) || "{}"); } catch (e) { return {}; }
  }

  function remember(itemId, recommendationId) {
    var known = attribution();
    known[itemId] = recommendationId;
    writeStorage("sessionStorage", ATTRIBUTION_KEY, JSON.stringify(known));
  }

  function device() {
    var ua = root.navigator.userAgent || "";
    if (/iPad|Tablet/i.test(ua)) return "tablet";
    return /Mobi|Android|iPhone/i.test(ua) ? "mobile" : "desktop";
  }

  function eventContext() {
    var context = { device: device(), session_id: sessionId() };
    if (root.navigator.language) context.locale = root.navigator.language.slice(0, 16);
    if (root.document.referrer) context.referrer = root.document.referrer.slice(0, 256);
    return context;
  }

  function requireInit() {
    if (!config) throw new Error("Selaras: call Selaras.init({endpoint, key}) first");
  }

  function base(service) {
    var endpoint = config.endpoint;
    var url = typeof endpoint === "string" ? endpoint : endpoint[service];
    if (!url) throw new Error("Selaras: no endpoint for the " + service + " service");
    return url.replace(/\/+$/, "");
  }

  function init(options) {
    if (!options || !options.endpoint || !options.key) {
      throw new Error("Selaras.init needs {endpoint, key}: endpoint is a URL or {profile, recommend} URLs");
    }
    // With `requireConsent`, nothing is sent and no identifier is stored in the browser until the shop's
    // consent banner calls Selaras.consent(true); until then recommendations use an id kept in memory only.
    consented = !options.requireConsent;
    var visitorId = options.visitorId || storedVisitorId() || "sv-" + randomId();
    if (!options.visitorId && consented) keepVisitorId(visitorId, 365);
    config = {
      endpoint: options.endpoint,
      key: options.key,
      ownVisitorId: !options.visitorId,
      visitorId: visitorId,
      batchSize: Math.min(options.batchSize || 10, MAX_BATCH),
      flushIntervalMs: options.flushIntervalMs === undefined ? 2000 : options.flushIntervalMs,
      onError: options.onError || function (error) { root.console.warn("Selaras:", error); },
    };
    clockOffsetMs = Number(readStorage("sessionStorage", CLOCK_KEY)) || 0;
    if (!listening) {
      listening = true;
      // The last moment a page is known to be alive: send what is queued. A keepalive request outlives it.
      root.addEventListener("pagehide", function () { flush(true); });
      root.document.addEventListener("visibilitychange", function () {
        if (root.document.visibilityState === "hidden") flush(true);
      });
    }
    return { visitorId: config.visitorId, version: VERSION };
  }

  function consent(granted) {
    requireInit();
    consented = Boolean(granted);
    // Refused: what was waiting is dropped, not sent later, and the stored id is removed.
    if (config.ownVisitorId) keepVisitorId(config.visitorId, consented ? 365 : 0);
    if (!consented) queue = [];
    else flush(false);
  }

  function track(type, props) {
    requireInit();
    if (BROWSER_EVENT_TYPES.indexOf(type) < 0) {
      throw new Error("Selaras.track: " + type + " events are sent by the shop's server, not the browser");
    }
    if (!consented) return null;
    props = props || {};
    var event = {
      event_id: randomId(),
      visitor_id: config.visitorId,
      type: type,
      timestamp: null, // stamped when sent, with the latest known offset to the service clock
      context: eventContext(),
      properties: {},
    };
    Object.keys(props).forEach(function (name) {
      if (EVENT_FIELDS.indexOf(name) >= 0) event[name] = props[name];
      else if (name === "properties") Object.assign(event.properties, props.properties);
      else event.properties[name] = props[name];
    });
    if (!event.recommendation_id && event.item_id && ATTRIBUTED_TYPES.indexOf(type) >= 0) {
      var known = attribution()[event.item_id];
      if (known) event.recommendation_id = known;
    }
    queue.push({ at: Date.now(), event: event });
    if (queue.length >= config.batchSize) flush(false);
    else if (!timer && config.flushIntervalMs > 0) {
      timer = root.setTimeout(function () { timer = null; flush(false); }, config.flushIntervalMs);
    }
    return event.event_id;
  }

  // `navigator.sendBeacon` cannot carry the X-API-Key header, so page-hide flushes use fetch with
  // `keepalive`, the same guarantee (the request outlives the page) with headers. Events are idempotent on
  // event_id, so a batch that was sent twice is counted once.
  function flush(unloading) {
    if (timer) { root.clearTimeout(timer); timer = null; }
    if (!config || !consented || queue.length === 0) return Promise.resolve(null);
    var sending = [];
    var stamped = queue.map(function (queued) {
      queued.event.timestamp = new Date(queued.at + clockOffsetMs).toISOString();
      return queued.event;
    });
    queue = [];
    while (stamped.length) sending.push(stamped.splice(0, MAX_BATCH));
    return Promise.all(sending.map(function (events) { return send(events, unloading, true); }));
  }

  // The service stores nothing of a batch with an invalid event and names the invalid ones by index: those
  // are reported and the others sent again, once, so one bad property does not lose a visitor's page views.
  function send(events, unloading, retry) {
    return post(base("profile") + "/v1/events", { events: events }, unloading).catch(function (error) {
      config.onError(error);
      var invalid = error.status === 422 && error.answer && error.answer.errors;
      if (!retry || !invalid) return null;
      var bad = invalid.map(function (e) { return e.index; });
      if (bad.some(function (index) { return typeof index !== "number"; })) return null;
      var valid = events.filter(function (_, index) { return bad.indexOf(index) < 0; });
      return valid.length ? send(valid, unloading, false) : null;
    });
  }

  function post(url, body, keepalive) {
    return root.fetch(url, {
      method: "POST",
      mode: "cors",
      credentials: "omit",
      keepalive: Boolean(keepalive),
      headers: { "Content-Type": "application/json", "X-API-Key": config.key },
      body: JSON.stringify(body),
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (answer) {
        if (!response.ok) {
          var error = new Error("Selaras: " + url + " answered " + response.status + ": " +
            (answer && answer.detail ? JSON.stringify(answer.detail) : response.statusText));
          error.status = response.status;
          error.answer = answer;
          throw error;
        }
        return answer;
      });
    });
  }

  // slots: names ("home") or slot requests ({name, kind, count, filters}); context: {page, device, city, ...}.
  function recommend(slotList, context) {
    requireInit();
    var requested = slotList.map(function (slot) { return typeof slot === "string" ? { name: slot } : slot; });
    var body = { visitor_id: config.visitorId, slots: requested };
    if (context) body.context = context;
    var sent = Date.now();
    return post(base("recommend") + "/v1/recommend", body, false).then(function (answer) {
      if (answer.time && answer.time.source === "clock") {
        clockOffsetMs = Date.parse(answer.time.now) - (sent + Date.now()) / 2;
        writeStorage("sessionStorage", CLOCK_KEY, String(Math.round(clockOffsetMs))); // for the next pages
      }
      answer.slots.forEach(function (slot) {
        slots[slot.name] = { recommendation_id: answer.recommendation_id, slot: slot };
      });
      return answer;
    });
  }

  function defaultTemplate(item) {
    var link = root.document.createElement("a");
    link.className = "selaras-item";
    if (item.url) link.href = item.url;
    if (item.image_url) {
      var image = root.document.createElement("img");
      image.src = item.image_url;
      image.alt = item.title;
      image.loading = "lazy";
      link.appendChild(image);
    }
    var title = root.document.createElement("span");
    title.className = "selaras-title";
    title.textContent = item.title; // text, never HTML: titles come from the catalog
    link.appendChild(title);
    if (item.price !== null && item.price !== undefined) {
      var price = root.document.createElement("span");
      price.className = "selaras-price";
      price.textContent = "Rp" + Math.round(item.price).toLocaleString("id-ID");
      link.appendChild(price);
    }
    return link;
  }

  function toNode(rendered) {
    if (rendered instanceof root.Node) return rendered;
    // A template that returns a string is trusted HTML: the template escapes what it interpolates.
    var wrapper = root.document.createElement("div");
    wrapper.innerHTML = String(rendered);
    return wrapper.firstElementChild || wrapper;
  }

  // Impressions are logged by the recommend service for every item it places (with position and propensity,
  // which experiments and policy evaluation need), and a `collect` key may not send them. What only the
  // browser knows is whether an item was on screen: the SDK tells the page with a `selaras:impression` DOM
  // event, for the shop's own analytics.
  function observeImpressions(nodes) {
    if (typeof root.IntersectionObserver !== "function") return;
    var observer = new root.IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (!entry.isIntersecting) return;
        observer.unobserve(entry.target);
        entry.target.dispatchEvent(new root.CustomEvent("selaras:impression", {
          bubbles: true,
          detail: {
            item_id: entry.target.getAttribute("data-selaras-item"),
            recommendation_id: entry.target.getAttribute("data-selaras-recommendation"),
            position: Number(entry.target.getAttribute("data-selaras-position")),
          },
        }));
      });
    }, { threshold: 0.5 });
    nodes.forEach(function (node) { observer.observe(node); });
  }

  // Renders a slot of the latest `recommend` answer (fetching it alone when it was not asked for) into
  // `element`. A click sends a `click` event echoing the recommendation id, at once (a navigation follows).
  function render(slotId, element, template) {
    requireInit();
    var cached = slots[slotId];
    var ready = cached ? Promise.resolve(cached) : recommend([slotId]).then(function () { return slots[slotId]; });
    return ready.then(function (shown) {
      var recommendationId = shown.recommendation_id;
      var nodes = shown.slot.items.map(function (item) {
        var node = toNode((template || defaultTemplate)(item));
        node.setAttribute("data-selaras-item", item.item_id);
        node.setAttribute("data-selaras-position", String(item.position));
        node.setAttribute("data-selaras-recommendation", recommendationId);
        node.addEventListener("click", function () {
          remember(item.item_id, recommendationId);
          track("click", {
            item_id: item.item_id,
            recommendation_id: recommendationId,
            properties: { slot: slotId, position: item.position },
          });
          flush(true);
        });
        return node;
      });
      element.replaceChildren.apply(element, nodes);
      element.setAttribute("data-selaras-slot", slotId);
      element.setAttribute("data-selaras-recommendation", recommendationId);
      observeImpressions(nodes);
      return shown.slot;
    });
  }

  root.Selaras = {
    version: VERSION,
    init: init,
    consent: consent,
    track: track,
    flush: function () { return flush(false); },
    recommend: recommend,
    render: render,
    visitorId: function () { requireInit(); return config.visitorId; },
  };
})(globalThis);
