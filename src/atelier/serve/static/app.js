// atelier's page: plain DOM code over the JSON API (no build step). Every text from the server is
// set with textContent, never innerHTML, so product titles cannot inject markup.
"use strict";

const state = { cart: [], highlight: null };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

async function api(method, path, body, headers = {}) {
  const opts = { method, headers: { ...headers } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.detail) || `${res.status} ${res.statusText}`);
  return data;
}

function label(field, value) {
  return field === "category" && value.includes("_") ? value.split("_").slice(1).join("_").replace(/^\d+/, "") : value;
}

function chips(item, shared = []) {
  const box = el("div", "chips");
  const sharedKeys = new Set(shared.map((s) => `${s.field}=${s.value}`));
  for (const [field, values] of Object.entries(item.attributes || {})) {
    if (field === "category_specification") continue;
    for (const v of values) {
      const chip = el("span", sharedKeys.has(`${field}=${v}`) ? "chip shared" : "chip", `${field.split(".").pop()}: ${label(field, v)}`);
      box.append(chip);
    }
  }
  return box;
}

// The model's side of a recommendation (stage, candidate source, score, shared values, the stage's own
// words), folded away behind "why?": the shopper reads the one plain sentence above it.
function modelDetail(rec) {
  const box = el("details", "model");
  box.append(el("summary", null, "why?"));
  const why = rec.explanation;
  const rows = [["stage", why.stage], ["source", why.source || "—"], ["signal", why.signal],
    ["score", rec.score === null ? "— (a popularity rank)" : rec.score.toFixed(3)]];
  const shared = why.shared.map((s) => `${label(s.field, s.value)} (${s.source})`);
  if (shared.length) rows.push(["shares", shared.join(", ")]);
  if (why.detail) rows.push(["model says", why.detail]);
  const list = el("dl");
  for (const [k, v] of rows) list.append(el("dt", null, k), el("dd", null, v));
  box.append(list);
  return box;
}

function card(item, opts = {}) {
  const c = el(opts.tag || "div", "card");
  c.dataset.id = item.item_id;
  if (state.highlight && item.item_id === state.highlight) c.classList.add("new");
  c.append(el("h4", null, item.title || item.item_id));
  const meta = el("small", "muted", item.item_id);
  if (item.price_label) {
    const price = el("span", "price", ` · ${item.price_label}`);
    price.title = `catalogue price ${item.price} (H&M prices are normalised; the level is its fifth of the catalogue)`;
    meta.append(price);
  }
  if (opts.score !== undefined && opts.score !== null && !opts.rec) meta.append(` · score ${opts.score.toFixed(3)}`);
  c.append(meta);
  c.append(chips(item, opts.shared));
  if (opts.rec) {
    c.append(el("p", "why", opts.rec.explanation.reason));
    c.append(modelDetail(opts.rec));
  }
  const actions = el("div");
  const add = el("button", "add-cart", "Add to cart");
  add.type = "button";
  add.addEventListener("click", () => addToCart(item));
  const sim = el("button", "show-similar", "Similar");
  sim.type = "button";
  sim.addEventListener("click", () => showSimilar(item));
  const details = el("button", "show-product", "Details");
  details.type = "button";
  details.title = "the merchandiser's view (needs the API key)";
  details.addEventListener("click", () => showProduct(item));
  actions.append(add, sim, details);
  c.append(actions);
  return c;
}

function addToCart(item) {
  if (!state.cart.some((i) => i.item_id === item.item_id)) state.cart.push(item);
  renderCart();
}

function renderCart() {
  const list = $("cart");
  list.replaceChildren(...state.cart.map((i) => el("li", null, `${i.title} (${i.item_id})`)));
}

async function search(ev) {
  if (ev) ev.preventDefault();
  const params = new URLSearchParams({ query: $("q").value, limit: "24" });
  if ($("category").value) params.append("category", $("category").value);
  if ($("color").value) params.append("color", $("color").value);
  $("browse-status").textContent = "searching…";
  try {
    const page = await api("GET", `/items?${params}`);
    $("results").replaceChildren(...page.items.map((i) => card(i)));
    const fixed = Object.entries(page.corrections || {}).map(([typed, used]) => `"${used}" for "${typed}"`);
    $("browse-status").textContent = (page.source === "popular"
      ? `${page.items.length} popular items` : `${page.items.length} items found`)
      + (fixed.length ? `; searched ${fixed.join(", ")}` : "")
      + (page.ranked_by && page.ranked_by.length ? ` · ranked by ${page.ranked_by.map((r) => r.split(":")[0]).join(" + ")}` : "")
      + (page.notes && page.notes.length ? ` (${page.notes.join("; ")})` : "");
  } catch (e) {
    $("browse-status").textContent = `search failed: ${e.message}`;
  }
}

async function showSimilar(item) {
  $("similar-panel").hidden = false;
  $("similar-of").textContent = item.title;
  try {
    const res = await api("GET", `/items/${encodeURIComponent(item.item_id)}/similar?k=8`);
    $("similar").replaceChildren(...res.items.map((i) => card(i, { score: i.score })));
  } catch (e) {
    $("similar").replaceChildren(el("p", "error", e.message));
  }
}

// Attributes with where each came from: catalogue columns, the enricher (method, model id), the merchandiser.
function originsTable(origins) {
  const table = el("table", "origins");
  const head = el("tr");
  for (const h of ["field", "values", "from", "method · model"]) head.append(el("th", null, h));
  table.append(head);
  for (const o of origins) {
    const row = el("tr", `origin-${o.origin}`);
    row.append(el("td", null, `${o.kind === "re" ? "RE " : ""}${o.field}`), el("td", null, o.values.map((v) => label(o.field, v)).join(", ")),
      el("td", null, o.origin), el("td", null, [o.method, o.model_id].filter(Boolean).join(" · ")));
    table.append(row);
  }
  return table;
}

async function showProduct(item) {
  const panel = $("product-panel");
  panel.hidden = false;
  $("product-of").textContent = item.title;
  const body = $("product");
  body.replaceChildren(el("p", "muted", "loading…"));
  try {
    const v = await api("GET", `/items/${encodeURIComponent(item.item_id)}/merchandising`, undefined, { "X-API-Key": $("api-key").value });
    const carts = v.carts.length
      ? v.carts.map((c) => el("li", null, `${c.titles.join(" + ")} — ${c.times}×`))
      : [el("li", "muted", "not recommended to a cart yet")];
    body.replaceChildren(
      el("p", "muted", v.provenance), originsTable(v.origins),
      el("h4", null, `Colourways (${v.colourways.length})`), grid(v.colourways.map((i) => card(i))),
      el("h4", null, "Nearest items"), grid(v.neighbours.map((i) => card(i, { score: i.score }))),
      el("h4", null, "Recommended most to these carts"), listOf(carts), el("p", "muted", v.log));
  } catch (e) {
    body.replaceChildren(el("p", "error", `${e.message} (the merchandiser's view needs the API key)`));
  }
}

function grid(children) {
  const g = el("div", "grid");
  g.append(...children);
  return g;
}

function listOf(children) {
  const l = el("ul", "carts");
  l.append(...children);
  return l;
}

function num(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

// `shopperText` set: recommend for a fresh shopper who only describes what they want (used to show
// a just-added product live); otherwise for the cart, profile, context and user id on the page.
async function recommend(ev, shopperText) {
  if (ev) ev.preventDefault();
  let body;
  if (shopperText) {
    body = { k: 12, context: shopperText };
  } else {
    const profile = { height_cm: num("height"), weight_kg: num("weight"), age: num("age") };
    body = { k: 12, cart: state.cart.map((i) => i.item_id) };
    if (Object.values(profile).some((v) => v !== null)) body.profile = profile;
    if ($("context").value.trim()) body.context = $("context").value.trim();
    if ($("user-id").value.trim()) body.user_id = $("user-id").value.trim();
  }
  $("rec-status").textContent = "asking…";
  try {
    const res = await api("POST", "/recommend", body);
    $("degraded").hidden = !res.degraded;
    showAskedFor(shopperText);
    $("recs").replaceChildren(...res.items.map((i) => card(i, { tag: "li", rec: i, shared: i.explanation.shared })));
    const found = Object.entries(res.context_attributes).map(([f, v]) => `${f}=${v.map((x) => label(f, x)).join("/")}`);
    $("rec-status").textContent = `${res.items.length} items from stage "${res.stage}" in ${res.elapsed_ms} ms`
      + (found.length ? `; context understood as ${found.join(", ")}` : "")
      + (res.notes.length ? `; ${res.notes.join("; ")}` : "");
    return res;
  } catch (e) {
    $("rec-status").textContent = `recommend failed: ${e.message}`;
    return null;
  }
}

// What the answer was for, above the cards: the reasons ("in your cart") then read on their own.
function showAskedFor(shopperText) {
  const parts = [];
  if (shopperText) parts.push(`For a shopper describing "${shopperText}"`);
  else {
    if (state.cart.length) parts.push(`For your cart: ${state.cart.map((i) => i.title || i.item_id).join(", ")}`);
    if ($("context").value.trim()) parts.push(`asked for "${$("context").value.trim()}"`);
  }
  $("rec-for").textContent = parts.join(" · ");
  $("rec-for").hidden = !parts.length;
}

function productForm() {
  const product = { item_id: $("new-id").value.trim(), title: $("new-title").value.trim(), description: $("new-desc").value.trim() };
  const attributes = {};
  if ($("new-category").value) attributes.category = [$("new-category").value];
  if ($("new-color").value) attributes.color = [$("new-color").value];
  if (Object.keys(attributes).length) product.attributes = attributes;
  if (num("new-price") !== null) product.price = num("new-price");
  return product;
}

// What the enricher makes of the product, before it goes live: nothing is stored.
async function previewProduct() {
  if (!$("merch-form").reportValidity()) return;
  $("merch-preview").replaceChildren(el("p", "muted", "asking the enricher…"));
  try {
    const res = await api("POST", "/items/preview", productForm(), { "X-API-Key": $("api-key").value });
    const parts = [el("p", "muted", `${res.enricher} would store (not live yet):`), originsTable(res.origins)];
    if (res.issues.length) parts.push(el("p", "warn", res.issues.join("; ")));
    $("merch-preview").replaceChildren(...parts);
  } catch (e) {
    $("merch-preview").replaceChildren(el("p", "error", `preview failed: ${e.message}`));
  }
}

async function addProduct(ev) {
  ev.preventDefault();
  const product = productForm();
  $("merch-status").textContent = "adding…";
  $("merch-status").className = "muted";
  const t0 = performance.now();
  try {
    const res = await api("POST", "/items", product, { "X-API-Key": $("api-key").value });
    const ms = Math.round(performance.now() - t0);
    state.highlight = product.item_id;
    const attrs = Object.entries(res.item.clothes).map(([f, v]) => `${f}=${v.map((x) => label(f, x)).join("/")}`);
    $("merch-status").textContent = `Added ${product.item_id} in ${ms} ms (${attrs.join(", ")}).`;
    // Show it live: recommendations for a shopper whose context is the new product's own text.
    const recs = await recommend(null, `${product.title} ${product.description}`.trim());
    const rank = recs ? recs.items.findIndex((i) => i.item_id === product.item_id) : -1;
    $("merch-status").textContent += rank >= 0
      ? ` It appears at rank ${rank + 1} of the recommendations for a shopper describing it.`
      : " It is not in the top 12 for a shopper describing it.";
    $("merch-status").dataset.rank = String(rank + 1);
  } catch (e) {
    $("merch-status").textContent = `could not add: ${e.message}`;
    $("merch-status").className = "error";
  }
}

// The latest evaluation report: one table per cohort, the baselines and the served chain marked, the best
// value of each column in bold, then the report's plots. No report: the server's message says which command
// writes one.
const metric = (v) => (v === null || v === undefined ? "–" : v.toFixed(4));

function cohortTable(c) {
  const box = el("div", "cohort");
  box.dataset.cohort = c.cohort;
  const title = el("h3", null, c.title);
  if (c.users !== null) title.append(el("span", "muted", ` · ${c.users.toLocaleString("en")} users`));
  box.append(title, el("p", "muted about", c.about));
  const cols = [["map_at_12", "MAP@12"], ["recall_at_100", "Recall@100"]];
  if (c.rows.some((r) => r.cold_recall_at_100 !== null)) {
    cols.push(["cold_recall_at_100", "cold items R@100", "recall@100 of test purchases of items nobody bought in the training days"]);
  }
  const table = el("table", "eval");
  const head = el("tr");
  head.append(el("th", null, "model"));
  for (const [, h, hint] of cols) {
    const th = el("th", "num", h);
    if (hint) th.title = hint;
    head.append(th);
  }
  table.append(head);
  const best = Object.fromEntries(cols.map(([k]) => [k, Math.max(...c.rows.map((r) => r[k] ?? -1))]));
  for (const r of c.rows) {
    const row = el("tr", `role-${r.role}`);
    const name = el("td", null, r.model);
    if (r.role !== "other") name.append(" ", el("span", `tag ${r.role}`, r.role));
    row.append(name);
    for (const [k] of cols) {
      row.append(el("td", r[k] !== null && r[k] > 0 && r[k] === best[k] ? "num best" : "num", metric(r[k])));
    }
    table.append(row);
  }
  box.append(table);
  return box;
}

async function showEvaluation() {
  const body = $("eval-body");
  try {
    const rep = await api("GET", "/evaluation");
    const about = [rep.dataset, rep.created && `written ${rep.created}`, rep.git_commit && `commit ${rep.git_commit}`,
      rep.report].filter(Boolean).join(" · ");
    const parts = [el("p", "split", rep.split), el("p", "muted", about)];
    for (const note of rep.notes) parts.push(el("p", "warn", note));
    parts.push(grid(rep.cohorts.map(cohortTable)));
    if (rep.plots.length) {
      const plots = el("div", "plots");
      for (const p of rep.plots) {
        const fig = el("figure");
        const img = el("img");
        img.src = p.url;
        img.alt = `plot ${p.name}`;
        fig.append(img, el("figcaption", "muted", p.name));
        plots.append(fig);
      }
      parts.push(plots);
    }
    body.replaceChildren(...parts);
  } catch (e) {
    body.replaceChildren(el("p", "warn", e.message));
  }
}

async function init() {
  $("search-form").addEventListener("submit", search);
  $("profile-form").addEventListener("submit", recommend);
  $("merch-form").addEventListener("submit", addProduct);
  $("preview-product").addEventListener("click", previewProduct);
  $("clear-cart").addEventListener("click", () => { state.cart = []; renderCart(); });
  try {
    const meta = await api("GET", "/meta");
    for (const c of meta.categories) {
      for (const sel of ["category", "new-category"]) $(sel).append(new Option(c.label, c.value));
    }
    for (const c of meta.colors) for (const sel of ["color", "new-color"]) $(sel).append(new Option(c, c));
  } catch (e) { /* pickers stay minimal; search still works */ }
  fetch("/ready").then((r) => r.json()).then((r) => {
    $("ready").textContent = r.ready
      ? `${r.dataset} · ${r.model_id} · stages: ${Object.entries(r.stages).filter(([, s]) => s === "ready").map(([n]) => n).join(" → ")}`
      : `degraded: store ${r.store}`;
  }).catch(() => { $("ready").textContent = "service not ready"; });
  showEvaluation();
  await search();
  document.body.dataset.ready = "1";
}

init();
