// fxsparse's graph viewer: lays out (with ELK) and draws only what the expanded boxes show.
// Every string from the model reaches the page through textContent or setAttribute, never as markup.
(() => {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const root = document.getElementById("fxv");
  const D = JSON.parse(document.getElementById("fxv-data").textContent);
  const boxes = D.boxes, nodes = D.nodes, edges = D.edges;
  const $ = (selector) => root.querySelector(selector);
  const canvas = $(".fxv-canvas"), svg = $(".fxv-canvas svg"), scene = svg.querySelector(".fxv-scene");
  const side = $(".fxv-detail"), search = $(".fxv-bar input[type=search]"), found = $(".fxv-found");
  const plumbingToggle = $(".fxv-plumbing"), diffToggle = $(".fxv-diff");
  const MASK_ROLES = new Set(["weight", "mask", "masked", "frozen"]);
  const FETCH_ROLES = new Set(["weight", "mask", "masked", "param", "frozen", "sparse weight"]);
  const FONT = 12, LINE = 14, PAD = 8, MIN_SCALE_AT_FIT = 10.5 / FONT;  // no text under 10.5 CSS px at first

  const children = boxes.map(() => []);
  boxes.forEach((box, i) => { if (box.parent >= 0) children[box.parent].push(i); });
  const nodesIn = boxes.map(() => []);
  nodes.forEach((node, i) => nodesIn[node.box].push(i));
  const state = { expanded: new Set([0]), plumbing: false, diff: !!D.diff, selected: null, layoutRunning: false,
                  pending: false, view: { x: 0, y: 0, k: 1 }, positions: new Map(), drawn: new Map() };
  plumbingToggle.checked = state.plumbing;
  diffToggle.checked = state.diff;
  diffToggle.disabled = !D.diff;
  const elk = new ELK();

  // ---- what is visible ---------------------------------------------------------------------------------
  function shown(i) {
    const node = nodes[i];
    return !(node.plumbing && !state.plumbing) && !(node.mark === "removed" && !state.diff);
  }
  let liveCount = null;  // visible nodes in each box's subtree, for the current toggles
  function countLive() {
    liveCount = new Array(boxes.length).fill(0);
    nodes.forEach((node, i) => {
      if (!shown(i)) return;
      for (let b = node.box; b >= 0; b = boxes[b].parent) liveCount[b] += 1;
    });
  }
  // For each box: -1 when it is open (it and every box around it expanded), else the collapsed box that stands for it.
  function standIns() {
    const stand = new Array(boxes.length).fill(-1);
    const walk = (b, outer) => {
      stand[b] = outer >= 0 ? outer : (state.expanded.has(b) ? -1 : b);
      for (const c of children[b]) walk(c, stand[b]);
    };
    walk(0, -1);
    return stand;
  }
  function keyOf(i, stand) {  // the drawn item standing for node i
    const s = stand[nodes[i].box];
    return s < 0 ? "n" + i : "b" + s;
  }
  function visibleEnd(i) {  // a hidden getitem passes its edges through to what it reads
    let seen = 0;
    while (!shown(i)) {
      if (nodes[i].via === undefined || ++seen > 64) return -1;
      i = nodes[i].via;
    }
    return i;
  }

  // ---- text and sizes -----------------------------------------------------------------------------------
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = `${FONT}px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif`;
  const width = (lines) => Math.ceil(Math.max(...lines.map((l) => measure.measureText(l).width))) + 2 * PAD;
  function fitted(text, room) {  // cut to fit the frame; the full path is the header's tooltip
    if (measure.measureText(text).width <= room) return text;
    let low = 0, high = text.length;
    while (low < high) {
      const middle = Math.ceil((low + high) / 2);
      if (measure.measureText(text.slice(0, middle) + "…").width <= room) low = middle; else high = middle - 1;
    }
    return text.slice(0, low) + "…";
  }
  function shortTarget(node) {
    const t = String(node.target);
    if (node.op === "get_attr" || node.op === "call_module") return t;
    return t.replace(/^torch\.ops\.aten\./, "").replace(/^torch\.ops\./, "").replace(/\.default$/, "")
      .replace(/^torch\.(nn\.functional\.)?/, "");
  }
  // A fetch's parameter is its target; any other node of fxsparse's names it in its info.
  const paramOf = (node) => (node.info && node.info.param) || (node.op === "get_attr" ? node.target : undefined);
  // Inside its module's box a node needs no module path in its name: "weight_mask", not
  // "model_layers_0_self_attn_q_proj_weight_mask" (the tooltip and the side panel have it all).
  function shortName(node) {
    const prefix = boxes[node.box].path.replace(/\./g, "_") + "_";
    return boxes[node.box].path && node.name.startsWith(prefix) && node.name.length > prefix.length
      ? node.name.slice(prefix.length) : node.name;
  }
  function nodeLines(i) {
    const node = nodes[i], info = Object.assign({}, node.info || {}, D.sparsity[paramOf(node)] || {});
    if (node.kind === "masked") return ["mask * weight", (paramOf(node) || node.name) + (info.density ? `  ${info.density}` : "")];
    if (node.kind === "mask") return [shortName(node), ["mask", info.density, info.pattern].filter(Boolean).join("  ")];
    if (node.op === "placeholder" || node.op === "output") return [node.name];
    const second = info["kernel layout"] ? `${shortTarget(node)}  ${info["kernel layout"]}` : shortTarget(node);
    return [shortName(node), second];
  }
  function boxLines(b) {
    const box = boxes[b];
    if (box.run) return [box.name, `×${box.run} folded`];
    const title = box.class ? `${box.name}: ${box.class}` : box.name;
    const parts = [];
    if (box.stack) parts.push(`×${box.stack}${box.of ? " " + box.of : ""}`);
    else parts.push(`${box.nodes} node${box.nodes === 1 ? "" : "s"}`);
    if (box.masked) parts.push(`${box.masked} masked`);
    return [title, parts.join(" · ")];
  }

  // ---- the ELK graph of what is visible ---------------------------------------------------------------
  function buildGraph() {
    if (liveCount === null) countLive();
    const stand = standIns();
    const items = new Map();  // key -> {kind, index, lines}
    const toElk = (b) => {
      const elkChildren = [];
      for (const i of nodesIn[b]) {
        if (!shown(i)) continue;
        const lines = nodeLines(i);
        items.set("n" + i, { node: i, lines });
        elkChildren.push({ id: "n" + i, width: width(lines), height: lines.length * LINE + 2 * 5 });
      }
      for (const c of children[b]) {
        if (!liveCount[c]) continue;
        if (state.expanded.has(c)) {
          const lines = boxLines(c).slice(0, 1);
          items.set("g" + c, { group: c, lines });
          elkChildren.push({ id: "g" + c, children: toElk(c), layoutOptions: {
            "elk.padding": `[top=${LINE + 14},left=10,bottom=10,right=10]` } });
        } else {
          const lines = boxLines(c);
          items.set("b" + c, { box: c, lines });
          elkChildren.push({ id: "b" + c, width: width(lines) + 8, height: lines.length * LINE + 14 });
        }
      }
      return elkChildren;
    };
    const graphChildren = toElk(0);
    const seen = new Set(), elkEdges = [];
    for (const [u0, v0, removed] of edges) {
      if (removed && !state.diff) continue;
      const u = visibleEnd(u0), v = visibleEnd(v0);
      if (u < 0 || v < 0 || v !== v0) continue;
      const a = keyOf(u, stand), b = keyOf(v, stand);
      if (a === b || !items.has(a) || !items.has(b)) continue;
      // A closed box sends out what it computes, not the weights it holds: a tied weight (GPT-2's
      // lm_head and wte) would otherwise draw the head above the embedding. Open the box to see it.
      if (a[0] === "b" && FETCH_ROLES.has(nodes[u].role || (nodes[u].op === "get_attr" ? "param" : ""))) continue;
      const id = a + ">" + b;
      if (seen.has(id)) continue;
      seen.add(id);
      elkEdges.push({ id, sources: [a], targets: [b], removed: !!removed });
    }
    return { items, graph: { id: "root", children: graphChildren, edges: elkEdges, layoutOptions: {
      "elk.algorithm": "layered", "elk.direction": "DOWN", "elk.hierarchyHandling": "INCLUDE_CHILDREN",
      "elk.json.shapeCoords": "ROOT", "elk.json.edgeCoords": "ROOT", "elk.edgeRouting": "ORTHOGONAL",
      "elk.layered.spacing.nodeNodeBetweenLayers": "20", "elk.spacing.nodeNode": "18",
      "elk.padding": "[top=12,left=12,bottom=12,right=12]" } } };
  }

  // ---- drawing --------------------------------------------------------------------------------------------
  const make = (tag, attributes, parent) => {
    const element = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, String(value));
    if (parent) parent.append(element);
    return element;
  };
  function markOf(key, item) {
    if (!state.diff) return null;
    if (item.node !== undefined) return nodes[item.node].mark || null;
    const b = item.box !== undefined ? item.box : item.group;
    return boxes[b].mark || null;
  }
  function drawText(group, lines, x, y, light) {
    lines.forEach((line, n) => {
      const text = make("text", { x, y: y + (n + 1) * LINE - 3 }, group);
      if (light) text.setAttribute("class", "fxv-light");
      text.textContent = line;
    });
  }
  function draw(result, items) {
    scene.replaceChildren();
    state.drawn = new Map();
    const groups = make("g", {}, scene), lines = make("g", {}, scene), leaves = make("g", {}, scene);
    const place = (elkNode) => {
      for (const child of elkNode.children || []) {
        const item = items.get(child.id);
        state.positions.set(child.id, child);
        if (item.group !== undefined) {
          const g = make("g", { class: "fxv-group", "data-key": child.id }, groups);
          const frame = make("rect", { x: child.x, y: child.y, width: child.width, height: child.height, rx: 6 }, g);
          const mark = markOf(child.id, item);
          if (mark) frame.setAttribute("style", `stroke:${D.marks[mark][0]};stroke-width:2.5`);
          const header = make("rect", { class: "fxv-header", x: child.x, y: child.y, width: child.width,
                                        height: LINE + 10, tabindex: 0, role: "button" }, g);
          header.setAttribute("aria-label", "close " + (boxes[item.group].path || "(model)"));
          make("title", {}, header).textContent = "collapse " + boxes[item.group].path;
          const label = make("text", { class: "fxv-grouplabel", x: child.x + 8, y: child.y + LINE + 1 }, g);
          label.textContent = fitted("▾ " + boxLines(item.group)[0], child.width - 12);
          state.drawn.set(child.id, g);
          place(child);
        } else {
          const g = make("g", { class: "fxv-item " + (item.box !== undefined ? "fxv-box" : "fxv-node"),
                                "data-key": child.id, tabindex: 0, role: "button" }, leaves);
          g.setAttribute("aria-label", item.lines.join(", "));
          if (item.box !== undefined && boxes[item.box].run) g.setAttribute("data-run", boxes[item.box].run);
          if (item.box !== undefined && boxes[item.box].stack) g.setAttribute("data-stack", boxes[item.box].stack);
          let fill = D.kinds.module, light = false;
          if (item.node !== undefined) {
            fill = D.kinds[nodes[item.node].kind] || "#ffffff";
            light = nodes[item.node].kind === "masked";
          }
          const rect = make("rect", { x: child.x, y: child.y, width: child.width, height: child.height,
                                      rx: item.box !== undefined ? 3 : 8, fill }, g);
          const mark = markOf(child.id, item);
          if (mark) {
            rect.setAttribute("style", `stroke:${D.marks[mark][0]};stroke-width:3` +
                                       (D.marks[mark][1] === "dashed" ? ";stroke-dasharray:6 4" : ""));
            g.setAttribute("data-mark", mark);
          }
          if (item.box !== undefined) {  // a collapsed box: a second outline says it opens
            make("rect", { x: child.x + 3, y: child.y + 3, width: child.width - 6, height: child.height - 6,
                           rx: 2, fill: "none", style: "stroke-width:.6" }, g);
          }
          drawText(g, item.lines, child.x + PAD + (item.box !== undefined ? 4 : 0),
                   child.y + (item.box !== undefined ? 7 : 5), light);
          make("title", {}, g).textContent = item.box !== undefined ? boxes[item.box].path || "(model)" : nodes[item.node].name;
          state.drawn.set(child.id, g);
        }
      }
    };
    place(result);
    for (const edge of result.edges || []) {
      for (const section of edge.sections || []) {
        const points = [section.startPoint, ...(section.bendPoints || []), section.endPoint];
        const path = make("polyline", { class: "fxv-edge" + (edge.removed ? " fxv-removed" : ""),
                                         points: points.map((p) => `${p.x},${p.y}`).join(" "),
                                         "marker-end": "url(#fxv-arrow)" }, lines);
        if (edge.removed) path.setAttribute("style", `stroke:${D.marks.removed[0]}`);
      }
    }
    state.size = { width: result.width || 0, height: result.height || 0 };
    highlight();
  }

  // ---- layout runs, one at a time ----------------------------------------------------------------------
  let afterLayout = [];
  function relayout(then) {
    if (then) afterLayout.push(then);
    if (state.layoutRunning) { state.pending = true; return; }
    state.layoutRunning = true;
    const { items, graph } = buildGraph();
    const started = performance.now();
    elk.layout(graph).then((result) => {
      draw(result, items);
      state.lastLayoutMs = performance.now() - started;
      state.layoutRunning = false;
      if (state.pending) { state.pending = false; relayout(); return; }
      const callbacks = afterLayout; afterLayout = [];
      for (const callback of callbacks) callback();
      root.dispatchEvent(new CustomEvent("fxv-drawn"));
    }).catch((error) => {
      state.layoutRunning = false;
      found.textContent = "layout failed: " + error;
    });
  }

  // ---- pan and zoom --------------------------------------------------------------------------------------
  let frame = 0;
  function apply() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const { x, y, k } = state.view;
      scene.setAttribute("transform", `translate(${x},${y}) scale(${k})`);
    });
  }
  function zoomAt(factor, px, py) {
    const v = state.view, k = Math.min(4, Math.max(0.05, v.k * factor));
    v.x = px - (px - v.x) * (k / v.k); v.y = py - (py - v.y) * (k / v.k); v.k = k;
    apply();
  }
  function fit(readable) {  // readable: never below MIN_SCALE_AT_FIT (the top of a big graph shows first)
    const w = canvas.clientWidth, h = canvas.clientHeight, s = state.size || { width: 1, height: 1 };
    let k = Math.min(1.25, (w - 24) / Math.max(1, s.width), (h - 24) / Math.max(1, s.height));
    if (readable) k = Math.max(k, MIN_SCALE_AT_FIT);
    state.view = { k, x: Math.max(12, (w - s.width * k) / 2), y: Math.max(12, (h - s.height * k) / 2) };
    if (s.width * k > w) state.view.x = 12;
    apply();
  }
  function centreOn(key) {
    const p = state.positions.get(key);
    if (!p) return;
    const w = canvas.clientWidth, h = canvas.clientHeight, v = state.view;
    v.k = Math.max(v.k, MIN_SCALE_AT_FIT);
    v.x = w / 2 - (p.x + p.width / 2) * v.k; v.y = h / 2 - (p.y + p.height / 2) * v.k;
    apply();
  }
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const r = canvas.getBoundingClientRect();
    // A pinch on a touchpad arrives as ctrl + wheel, a mouse wheel as whole steps: both zoom.
    // A touchpad's two-finger scroll (small, often sideways deltas) pans.
    const steps = event.deltaMode === 1 || (event.deltaX === 0 && Math.abs(event.deltaY) >= 50 && Number.isInteger(event.deltaY));
    if (event.ctrlKey || steps) {
      zoomAt(Math.exp(-event.deltaY * (event.ctrlKey ? 0.01 : 0.0015)), event.clientX - r.left, event.clientY - r.top);
    } else {
      state.view.x -= event.deltaX; state.view.y -= event.deltaY; apply();
    }
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, vx: state.view.x, vy: state.view.y, moved: false, id: event.pointerId };
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 4) return;
    if (!drag.moved) { drag.moved = true; canvas.setPointerCapture(drag.id); canvas.classList.add("fxv-dragging"); }
    state.view.x = drag.vx + dx; state.view.y = drag.vy + dy; apply();
  });
  canvas.addEventListener("pointerup", (event) => {
    const wasDrag = drag && drag.moved;
    drag = null;
    canvas.classList.remove("fxv-dragging");
    if (!wasDrag) clicked(event.target);
  });

  // Keyboard: Tab reaches every box and node, Enter or Space does what a click does.
  svg.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    clicked(event.target);
  });

  // ---- clicks, selection, the side panel ----------------------------------------------------------------
  function clicked(target) {
    const holder = target.closest && target.closest("[data-key]");
    if (!holder) return;
    const key = holder.getAttribute("data-key");
    if (key[0] === "g") {  // an open box: its header closes it
      if (!target.classList.contains("fxv-header")) return;
      const b = Number(key.slice(1));
      select("b" + b);
      toggle(b);
    } else if (key[0] === "b") {
      select(key);
      toggle(Number(key.slice(1)));
    } else {
      select(key);
    }
  }
  function toggle(b) {
    const before = state.positions.get(state.expanded.has(b) ? "g" + b : "b" + b);
    const anchor = before && { sx: before.x * state.view.k + state.view.x, sy: before.y * state.view.k + state.view.y };
    if (state.expanded.has(b)) {
      state.expanded.delete(b);
      for (const c of descendants(b)) state.expanded.delete(c);
    } else {
      state.expanded.add(b);
    }
    relayout(() => {  // the box stays where it was on the screen
      const after = state.positions.get(state.expanded.has(b) ? "g" + b : "b" + b);
      if (anchor && after) {
        state.view.x = anchor.sx - after.x * state.view.k; state.view.y = anchor.sy - after.y * state.view.k; apply();
      }
    });
  }
  function descendants(b) {
    const out = [];
    const walk = (x) => { for (const c of children[x]) { out.push(c); walk(c); } };
    walk(b);
    return out;
  }
  function highlight() {
    for (const element of scene.querySelectorAll(".fxv-selected")) element.classList.remove("fxv-selected");
    if (!state.selected) return;
    const g = state.drawn.get(state.selected) || state.drawn.get("g" + state.selected.slice(1));
    if (g) g.classList.add("fxv-selected");
  }
  function row(list, term, value) {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = term; dd.textContent = String(value);
    list.append(dt, dd);
  }
  function select(key) {
    state.selected = key;
    highlight();
    side.replaceChildren();
    const heading = document.createElement("h2"), list = document.createElement("dl");
    side.append(heading, list);
    if (key[0] === "n") {
      const i = Number(key.slice(1)), node = nodes[i];
      heading.textContent = node.name;
      row(list, "op", node.op);
      row(list, "target", node.target);
      row(list, "module", boxes[node.box].path || "(model)");
      row(list, "kind", node.kind);
      if (node.mark) row(list, "diff", node.mark);
      const inputs = edges.filter((e) => e[1] === i && !e[2]).map((e) => nodes[e[0]]);
      inputs.forEach((input, n) => row(list, n ? "" : "inputs", `${input.name}${input.shape ? "  " + input.shape : ""}`));
      row(list, "output", node.shape);
      if (node.role) row(list, "fxsparse role", `${node.role}: ${D.roles[node.role] || ""}`);
      for (const [name, value] of Object.entries(node.info || {})) row(list, name, value);
      const sparsity = MASK_ROLES.has(node.role) && D.sparsity[paramOf(node)];
      for (const [name, value] of Object.entries(sparsity || {})) row(list, name, value);
    } else {
      const b = Number(key.slice(1)), box = boxes[b];
      heading.textContent = box.path || "(model)";
      row(list, "module", box.class);
      if (box.run) row(list, "folded run", `${box.run} modules`);
      if (box.stack) row(list, "stack of", `${box.stack}${box.of ? " " + box.of : ""}`);
      row(list, "nodes", box.nodes);
      row(list, "masked weights", box.masked);
      if (state.diff) row(list, "diff", box.mark ? `${box.mark} inside` : "nothing changed inside");
    }
  }

  // ---- search -------------------------------------------------------------------------------------------
  let matches = [], current = -1, lastQuery = "";
  function findAll(query) {
    const q = query.toLowerCase(), exact = [], partial = [];
    const consider = (key, names) => {
      const lower = names.filter(Boolean).map((n) => String(n).toLowerCase());
      if (lower.some((n) => n === q)) exact.push(key);
      else if (lower.some((n) => n.includes(q))) partial.push(key);
    };
    nodes.forEach((node, i) => consider("n" + i, [node.name, node.target, paramOf(node), node.info && node.info.mask]));
    boxes.forEach((box, b) => { if (b) consider("b" + b, [box.path]); });
    return exact.concat(partial);
  }
  function reveal(key, then) {
    if (key[0] === "n") {
      const node = nodes[Number(key.slice(1))];
      if (node.plumbing && !state.plumbing) setPlumbing(true, false);
      if (node.mark === "removed" && !state.diff) setDiff(true, false);
      for (let b = node.box; b >= 0; b = boxes[b].parent) state.expanded.add(b);
    } else {
      for (let b = boxes[Number(key.slice(1))].parent; b >= 0; b = boxes[b].parent) state.expanded.add(b);
    }
    relayout(() => { centreOn(key); select(key); if (then) then(); });
  }
  function go(step) {
    const query = search.value.trim();
    if (!query) { found.textContent = ""; return; }
    if (query !== lastQuery) { matches = findAll(query); current = -1; lastQuery = query; }
    if (!matches.length) { found.textContent = "not found"; return; }
    current = (current + step + matches.length) % matches.length;
    found.textContent = `${current + 1} of ${matches.length}`;
    reveal(matches[current]);
  }
  search.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); go(event.shiftKey ? -1 : 1); }
  });
  search.addEventListener("search", () => go(1));

  // ---- toggles, legend, the list of changes --------------------------------------------------------------
  function setPlumbing(on, layout = true) {
    state.plumbing = on; plumbingToggle.checked = on; liveCount = null;
    if (layout) relayout();
  }
  function setDiff(on, layout = true) {
    state.diff = on && !!D.diff; diffToggle.checked = state.diff; liveCount = null;
    $(".fxv-changelist").hidden = !state.diff;
    if (layout) relayout();
  }
  plumbingToggle.addEventListener("change", () => setPlumbing(plumbingToggle.checked));
  diffToggle.addEventListener("change", () => setDiff(diffToggle.checked));
  $(".fxv-fit").addEventListener("click", () => fit(false));
  $(".fxv-zoomin").addEventListener("click", () => zoomAt(1.25, canvas.clientWidth / 2, canvas.clientHeight / 2));
  $(".fxv-zoomout").addEventListener("click", () => zoomAt(0.8, canvas.clientWidth / 2, canvas.clientHeight / 2));
  $(".fxv-collapse").addEventListener("click", () => { state.expanded = new Set([0]); autoExpand(); relayout(() => fit(true)); });

  const legend = $(".fxv-legend");
  const kindsShown = new Set(nodes.map((n) => n.kind));
  for (const [kind, colour] of Object.entries(D.kinds)) {
    if (!kindsShown.has(kind)) continue;
    const key = document.createElement("span");
    key.style.background = colour; key.textContent = kind;
    legend.append(key);
  }
  if (D.diff) {
    for (const [mark, [colour, style]] of Object.entries(D.marks)) {
      const key = document.createElement("span");
      key.className = "fxv-markkey"; key.style.borderColor = colour; key.style.borderStyle = style;
      key.textContent = mark;
      legend.append(key);
    }
  }
  const changeList = $(".fxv-changes");
  $(".fxv-changelist").hidden = !state.diff;
  $(".fxv-changecount").textContent = String(D.changes.length);
  // The list grows a page at a time: a 5,000-layer model has 25,000 changes.
  let listed = 0;
  const more = document.createElement("button");
  more.type = "button"; more.className = "fxv-more";
  function listMore() {
    more.remove();
    for (const i of D.changes.slice(listed, listed + 200)) {
      const item = document.createElement("li"), button = document.createElement("button");
      button.type = "button";
      button.textContent = `${nodes[i].mark}: ${nodes[i].name}` + (boxes[nodes[i].box].path ? `  (${boxes[nodes[i].box].path})` : "");
      button.setAttribute("data-key", "n" + i);
      button.addEventListener("click", () => reveal("n" + i));
      item.append(button);
      changeList.append(item);
    }
    listed = Math.min(D.changes.length, listed + 200);
    if (listed < D.changes.length) {
      more.textContent = `${D.changes.length - listed} more…`;
      changeList.append(more);
    }
  }
  more.addEventListener("click", listMore);
  listMore();
  $(".fxv-title").textContent = D.title;

  // ---- the first screen: open boxes breadth first while it stays small; stacks and leaf modules stay shut ----
  const FIRST_SCREEN = 24;
  function autoExpand() {
    countLive();
    const direct = (b) => nodesIn[b].filter(shown).length + children[b].filter((c) => liveCount[c]).length;
    let visible = direct(0), queue = children[0].slice();
    while (queue.length) {
      const next = [];
      for (const b of queue) {
        if (!liveCount[b] || boxes[b].stack || boxes[b].run || !children[b].some((c) => liveCount[c])) continue;
        const more = direct(b) - 1;
        if (visible + more > FIRST_SCREEN) continue;
        state.expanded.add(b); visible += more;
        next.push(...children[b]);
      }
      queue = next;
    }
  }
  // For tests and the benchmark: read-only facts about what is drawn, and when.
  const facts = root.fxv = {};
  autoExpand();
  relayout(() => {
    fit(true);
    requestAnimationFrame(() => {
      facts.readyAt = performance.now();  // since navigation started
      document.body.setAttribute("data-ready", "");
    });
  });
  // For tests and the benchmark: read-only facts about what is drawn.
  facts.state = state; facts.boxes = boxes; facts.nodes = nodes; facts.changes = D.changes;
  facts.centreOn = centreOn; facts.relayout = relayout;
})();
