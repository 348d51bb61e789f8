// mk-hspc annotation page. Labels live in localStorage first (so nothing is lost offline or on a static
// host), then go to the server (`kedro annotate`) through a queue of events with ids: a label counts as
// saved only when the server has acknowledged its event. All data text is set with textContent.
(function () {
  "use strict";
  var body = document.body;
  var root = body.dataset.root || "";
  var KEY_LABELS = "mkhspc.labels.v2", KEY_QUEUE = "mkhspc.queue.v1", KEY_ANNOTATOR = "mkhspc.annotator";
  var KEY_LABELS_V1 = "mkhspc.labels.v1";  // one map for every annotator (before v2): read once, by its entries' annotator
  var CHOICES = [["yes", "Yes", "y"], ["no", "No", "n"], ["unsure", "?", "u"]];
  var TILE = /^(.+)_s\d+_r\d+_c\d+_([a-z0-9]+)_\d{5,}$/;
  // lastError stays shown until the page is reloaded (a refused label, full storage); retryNotice only
  // until the server takes labels again (it was busy: nothing was refused).
  var serverUp = false, sending = false, lastError = "", retryNotice = "", batchLimit = 200, serverProgress = null;

  function load(key, fallback) {
    try { var v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; } catch (e) { return fallback; }
  }
  function store(key, value) { try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { lastError = "browser storage full"; } }
  // annotator -> cell_id -> {label, annotator, updated_at}: each person sees, counts and filters by their own
  // labels only (a shared browser must not show one annotator's labels as another's).
  var labelsBy = loadLabels();
  var queue = load(KEY_QUEUE, []);        // events not yet acknowledged by the server
  var annotatorInput = document.getElementById("annotator");
  var annotator = localStorage.getItem(KEY_ANNOTATOR) || "";
  annotatorInput.value = annotator;
  var labels = labelsOf(annotator);       // the current annotator's labels
  annotatorInput.addEventListener("change", function () {
    useAnnotator(annotatorInput.value.trim());
    figures.forEach(render);
    update();
    if (serverUp) { pullServerLabels(); }
  });

  // The one way the annotator changes (typed, proposed by the server, or "anonymous" at the first click):
  // the name, the input, the stored choice and the labels shown all follow it.
  function useAnnotator(name) {
    annotator = name;
    annotatorInput.value = name;
    localStorage.setItem(KEY_ANNOTATOR, name);
    labels = labelsOf(name);
  }

  function loadLabels() {
    var by = load(KEY_LABELS, null);
    if (by) { return by; }
    by = {};
    var old = load(KEY_LABELS_V1, {});
    Object.keys(old).forEach(function (cell) {
      var who = old[cell].annotator || "anonymous";
      (by[who] = by[who] || {})[cell] = old[cell];
    });
    return by;
  }
  function labelsOf(who) { return (labelsBy[who || "anonymous"] = labelsBy[who || "anonymous"] || {}); }

  var figures = Array.prototype.slice.call(document.querySelectorAll("figure.cell"));
  var current = -1;

  function newId() {
    if (window.crypto && crypto.randomUUID) { return crypto.randomUUID(); }
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function render(figure) {
    var entry = labels[figure.dataset.cell];
    var label = entry ? entry.label : "";
    if (label) { figure.dataset.label = label; } else { delete figure.dataset.label; }
    figure.querySelectorAll("button").forEach(function (b) { b.setAttribute("aria-pressed", String(b.value === label)); });
  }

  function setLabel(figure, label) {
    if (!annotator) { useAnnotator("anonymous"); }
    var now = new Date().toISOString();
    labels[figure.dataset.cell] = {label: label, annotator: annotator, updated_at: now};
    store(KEY_LABELS, labelsBy);
    queue.push({event_id: newId(), cell_id: figure.dataset.cell, label: label, time: now, annotator: annotator});
    store(KEY_QUEUE, queue);
    render(figure);
    update();
    flush();
  }

  function update() {
    var done = figures.filter(function (f) { return labels[f.dataset.cell]; }).length;
    var progress = document.getElementById("progress");
    if (figures.length) { progress.textContent = done + " / " + figures.length + " labelled on this page"; }
    var state = document.getElementById("save-state");
    var text, kind;
    if (lastError || retryNotice) { text = "error: " + (lastError || retryNotice); kind = "error"; }
    else if (!serverUp) { text = "offline: labels kept in this browser" + (queue.length ? " (" + queue.length + " to send)" : ""); kind = "offline"; }
    else if (queue.length || sending) { text = "queued: " + queue.length + " to save"; kind = "queued"; }
    else { text = "saved"; kind = "saved"; }
    state.textContent = text;
    state.dataset.state = kind;
    applyFilter();
    fillIndex();
  }

  function applyFilter() {
    var only = document.getElementById("only-unlabelled").checked;
    figures.forEach(function (f) { f.hidden = only && !!labels[f.dataset.cell] && f !== figures[current]; });
  }

  function focus(index) {
    var visible = figures.filter(function (f) { return !f.hidden; });
    if (!visible.length) { return; }
    if (current >= 0) { figures[current].classList.remove("current"); }
    current = Math.max(0, Math.min(index, figures.length - 1));
    figures[current].classList.add("current");
    figures[current].scrollIntoView({block: "nearest"});
  }

  function step(direction) {
    var i = current;
    do { i += direction; } while (i >= 0 && i < figures.length && figures[i].hidden);
    if (i >= 0 && i < figures.length) { focus(i); }
  }

  // The stored queue (other tabs of the site add to it) and this page's own, by event id: an event that
  // could not be stored (browser storage full) is kept from memory, never dropped.
  function mergedQueue() {
    var seen = {}, merged = [];
    load(KEY_QUEUE, []).concat(queue).forEach(function (e) {
      if (!seen[e.event_id]) { seen[e.event_id] = true; merged.push(e); }
    });
    return merged;
  }

  function flush() {
    if (sending || !queue.length || !serverUp) { update(); return; }
    sending = true;
    var batch = queue.filter(function (e) { return e.annotator === queue[0].annotator; }).slice(0, batchLimit);
    var payload = {annotator: batch[0].annotator, events: batch.map(function (e) {
      return {event_id: e.event_id, cell_id: e.cell_id, label: e.label, time: e.time};
    })};
    update();
    fetch(root + "api/labels", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload)})
      .then(function (response) {
        return response.json().catch(function () { return {}; })
          .then(function (data) { return {status: response.status, data: data}; });
      })
      .then(function (reply) {
        sending = false;
        if (reply.status >= 500 || reply.status === 408 || reply.status === 429) {
          // The server could not store them now (busy, a disk error): nothing was refused, send them later.
          serverUp = false; retryNotice = "server said " + reply.status + "; labels kept, will retry";
          update();
          return;
        }
        if (reply.status === 200) {
          retryNotice = "";
          var acked = {};
          reply.data.acked.forEach(function (id) { acked[id] = true; });
          queue = mergedQueue().filter(function (e) { return !acked[e.event_id]; });
          if (!queue.length) { batchLimit = 200; }
        } else if (batch.length > 1) {
          // A request is refused whole: resend one event at a time so that only the bad one is dropped.
          batchLimit = 1;
        } else {
          // Refused for good (e.g. a cell not in this export): keep the label locally, stop resending it.
          queue = mergedQueue().filter(function (e) { return e.event_id !== batch[0].event_id; });
          // Stays shown until the page is reloaded: a label the server refused must not go unnoticed.
          lastError = "a label was refused: " + (reply.data.error || ("server said " + reply.status));
        }
        store(KEY_QUEUE, queue);
        if (queue.length) { flush(); } else { update(); }
      })
      .catch(function () { sending = false; serverUp = false; update(); });
  }

  function checkServer() {
    if (location.protocol === "file:") { serverUp = false; update(); return; }
    fetch(root + "api/health", {cache: "no-store"}).then(function (r) { return r.ok ? r.json() : null; })
      .then(function (health) {
        var wasUp = serverUp;
        serverUp = !!(health && health.ok);
        if (serverUp && !annotator && health.annotator) {
          useAnnotator(health.annotator);
        }
        if (serverUp && !wasUp) { pullServerLabels(); }
        if (serverUp && document.querySelector("td.done")) { pullProgress(); }
        flush();
      })
      .catch(function () { serverUp = false; update(); });
  }

  function pullServerLabels() {
    if (!annotator) { return; }
    fetch(root + "api/labels?annotator=" + encodeURIComponent(annotator), {cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var pending = {};
        queue.forEach(function (e) { if (e.annotator === annotator) { pending[e.cell_id] = true; } });
        Object.keys(data.labels).forEach(function (cell) {
          if (!pending[cell]) { labels[cell] = {label: data.labels[cell], annotator: annotator, updated_at: (labels[cell] || {}).updated_at || new Date().toISOString()}; }
        });
        store(KEY_LABELS, labelsBy);
        figures.forEach(render);
        update();
      }).catch(function () {});
  }

  function pullProgress() {
    fetch(root + "api/progress", {cache: "no-store"}).then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { serverProgress = data; fillIndex(); } }).catch(function () {});
  }

  function download() {  // every annotator's labels given in this browser
    var entries = [];
    Object.keys(labelsBy).sort().forEach(function (who) {
      Object.keys(labelsBy[who]).forEach(function (cell) {
        var e = labelsBy[who][cell];
        entries.push({cell_id: cell, label: e.label, annotator: who, updated_at: e.updated_at});
      });
    });
    entries.sort(function (a, b) { return a.cell_id < b.cell_id ? -1 : a.cell_id > b.cell_id ? 1 : (a.annotator < b.annotator ? -1 : 1); });
    var blob = new Blob([JSON.stringify({version: 1, labels: entries}, null, 1)], {type: "application/json"});
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "annotations.json";
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 0);
  }

  function fillIndex() {
    var cells = document.querySelectorAll("td.done");
    if (!cells.length) { return; }
    var counts = {};
    if (serverProgress) {  // served: every annotator's labels, from the label store
      serverProgress.by_slide.forEach(function (row) { counts[row.slide + "\u0000" + row.cell_type] = row.labelled; });
    } else {               // static: this annotator's labels in this browser
      Object.keys(labels).forEach(function (cell) {
        var m = TILE.exec(cell);
        if (m) { var k = m[1] + "\u0000" + m[2]; counts[k] = (counts[k] || 0) + 1; }
      });
    }
    cells.forEach(function (td) { td.textContent = String(counts[td.dataset.slide + "\u0000" + td.dataset.type] || 0); });
  }

  figures.forEach(function (figure, index) {
    var bar = document.createElement("div");
    bar.className = "choices";
    CHOICES.forEach(function (choice) {
      var button = document.createElement("button");
      button.type = "button"; button.value = choice[0]; button.textContent = choice[1];
      button.title = choice[1] + " (" + choice[2] + ")"; button.className = "choice-" + choice[0];
      button.addEventListener("click", function () { focus(index); setLabel(figure, choice[0]); });
      bar.appendChild(button);
    });
    figure.appendChild(bar);
    render(figure);
  });

  document.addEventListener("keydown", function (event) {
    if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) { return; }
    var keys = {y: "yes", n: "no", u: "unsure"};
    if (keys[event.key] && current >= 0) {
      setLabel(figures[current], keys[event.key]);
      step(1);
      event.preventDefault();
    } else if (event.key === "ArrowRight" || event.key === "ArrowDown") { step(1); event.preventDefault(); }
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") { step(-1); event.preventDefault(); }
  });
  document.getElementById("only-unlabelled").addEventListener("change", update);
  document.getElementById("show-outlines").addEventListener("change", function (e) { body.classList.toggle("no-outlines", !e.target.checked); });
  document.getElementById("download").addEventListener("click", download);
  window.addEventListener("online", checkServer);
  window.addEventListener("storage", function () { labelsBy = loadLabels(); labels = labelsOf(annotator); queue = load(KEY_QUEUE, []); figures.forEach(render); update(); });
  setInterval(function () { if (!serverUp || queue.length) { checkServer(); } }, 3000);
  if (figures.length) { focus(0); }
  update();
  checkServer();
})();
