// escale dashboard: live updates over Server-Sent Events and two small interactions.
// No framework, no inline code (the CSP forbids it). Text from the server goes into the page
// with textContent only; HTML fragments come from escale's own escaped templates.
"use strict";
(function () {
  // Regions with data-refresh="URL" are re-fetched (debounced) when an event arrives: the
  // region of the same id in the answer (a page), or the whole answer (a fragment).
  var pending = null;
  function refresh() {
    pending = null;
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      fetch(el.getAttribute("data-refresh"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          // The session ended (logout elsewhere, expiry): go to the login page.
          if (r.redirected && new URL(r.url).pathname === "/login") { location.assign("/login"); }
          if (!r.ok || r.redirected) { throw new Error(String(r.status)); }
          return r.text();
        })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var src = (el.id && doc.getElementById(el.id)) || doc.body;
          el.replaceChildren.apply(el, Array.from(src.childNodes));
          el.setAttribute("data-updated", String(Date.now()));
        })
        .catch(function () { /* the next event tries again */ });
    });
  }
  function schedule() { if (!pending) { pending = setTimeout(refresh, 100); } }

  function activity(ev) {
    var list = document.getElementById("activity");
    if (!list || !ev.summary) { return; }
    var li = document.createElement("li");
    // When the event happened (server clock) and when it was shown: the page's latency.
    li.setAttribute("data-at", String(ev.at || ""));
    li.setAttribute("data-seen", String(Date.now()));
    var time = document.createElement("time");
    time.textContent = new Date(ev.at || Date.now()).toLocaleTimeString();
    li.appendChild(time);
    li.appendChild(document.createTextNode(ev.summary));
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 100) { list.removeChild(list.lastChild); }
  }

  function follow(url) {
    var es = new EventSource(url);
    es.onmessage = function (m) {
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      activity(ev);
      schedule();
    };
    es.onopen = function () { document.body.setAttribute("data-live-state", "open"); };
    es.onerror = function () { document.body.setAttribute("data-live-state", "reconnecting"); };
  }

  function logs(pre) {
    var filter = document.querySelector("[data-filter='" + pre.id + "']");
    function matches(line) { return !filter || !filter.value || line.textContent.indexOf(filter.value) >= 0; }
    var es = new EventSource(pre.getAttribute("data-src"));
    es.onmessage = function (m) {
      var l;
      try { l = JSON.parse(m.data); } catch (e) { return; }
      var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      var line = document.createElement("span");
      line.className = "line";
      var tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = l.tag + " ";
      line.appendChild(tag);
      line.appendChild(document.createTextNode(l.text + "\n"));
      line.hidden = !matches(line);
      pre.appendChild(line);
      while (pre.childNodes.length > 2000) { pre.removeChild(pre.firstChild); }
      if (atBottom) { pre.scrollTop = pre.scrollHeight; }
    };
    if (filter) {
      filter.addEventListener("input", function () {
        pre.querySelectorAll(".line").forEach(function (line) { line.hidden = !matches(line); });
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.body.getAttribute("data-live");
    if (live) { follow(live); }
    document.querySelectorAll("pre[data-src]").forEach(logs);
    // Forms whose button asks first (rollback, revoke, drain, ...).
    document.addEventListener("submit", function (e) {
      var b = e.submitter;
      var q = b && b.getAttribute("data-confirm");
      if (q && !window.confirm(q)) { e.preventDefault(); }
    });
  });
})();
