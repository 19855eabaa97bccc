/* conceptrank report: filtering by class and concept, plus a self-check for automated tests.
   Plain DOM APIs only; text is compared as data, never inserted as HTML. */
(function () {
  "use strict";
  var $ = function (sel) { return document.querySelector(sel); };
  var $$ = function (sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); };

  function list(el, attr) {
    try {
      var v = JSON.parse(el.getAttribute(attr) || "[]");
      return Array.isArray(v) ? v : [];
    } catch (e) {
      return [];
    }
  }

  function has(el, attr, value) { return list(el, attr).indexOf(value) >= 0; }

  function setSelect(sel, value) {
    if (!sel) return false;
    for (var i = 0; i < sel.options.length; i++) {
      if (sel.options[i].value === value) { sel.selectedIndex = i; return true; }
    }
    return false;
  }

  function apply() {
    var cls = $("#filter-class") ? $("#filter-class").value : "";
    var concept = $("#filter-concept") ? $("#filter-concept").value : "";
    var shown = { units: 0, classes: 0, panels: 0 };
    $$(".unit-card").forEach(function (el) {
      var ok = (!concept || has(el, "data-concepts", concept)) && (!cls || has(el, "data-classes", cls));
      el.hidden = !ok;
      if (ok) shown.units++;
    });
    $$(".image-panel").forEach(function (el) {
      var ok = (!cls || el.getAttribute("data-class") === cls) && (!concept || has(el, "data-concepts", concept));
      el.hidden = !ok;
      if (ok) shown.panels++;
    });
    $$(".class-section").forEach(function (el) {
      var ok = !cls || el.getAttribute("data-class") === cls;
      if (ok && concept) {
        ok = has(el, "data-concepts", concept) || el.querySelector(".image-panel:not([hidden])") !== null;
      }
      el.hidden = !ok;
      if (ok) shown.classes++;
    });
    $$(".chip").forEach(function (el) {
      el.classList.toggle("active", !!concept && el.getAttribute("data-concept") === concept);
    });
    var status = $("#filter-status");
    if (status) {
      status.textContent = (cls || concept)
        ? "showing " + shown.units + " units, " + shown.classes + " classes, " + shown.panels + " images"
        : "";
    }
    return shown;
  }

  function visible(el) {
    if (!el) return false;
    var r = el.getBoundingClientRect();
    var s = window.getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== "hidden" && s.display !== "none";
  }

  function selfcheck() {
    var imgs = $$("img");
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
      .map(function (i) { return i.getAttribute("src"); });
    var anchors = $$('a[href^="#"]').map(function (a) { return a.getAttribute("href").slice(1); })
      .filter(function (id) { return id && !document.getElementById(decodeURIComponent(id)); });
    var keys = ["#overview", "#figures", "#units", "#classes", ".unit-card", ".class-section", ".image-panel",
                "#agreement td.lift", "#agreement td.pval", ".badge.chance", ".chip.planted", ".fig img"];
    var elements = {};
    keys.forEach(function (k) { elements[k] = { present: !!$(k), visible: visible($(k)), count: $$(k).length }; });
    // Page-coordinate boxes of the main parts: the browser test crops its screenshots with them.
    var boxes = {};
    ["#overview", "#agreement", "#extra-scores", "#figures", "#units", "#classes", ".class-section"].forEach(function (k) {
      var el = $(k);
      if (!el) return;
      var r = el.getBoundingClientRect();
      boxes[k] = { top: Math.round(r.top + window.scrollY), left: Math.round(r.left), width: Math.round(r.width),
                   height: Math.round(r.height) };
    });
    return {
      boxes: boxes,
      errors: window.__reportErrors || [],
      images: imgs.length,
      broken_images: broken,
      missing_anchors: anchors,
      elements: elements
    };
  }

  function init() {
    var check = selfcheck();
    var cs = $("#filter-class"), cc = $("#filter-concept");
    if (cs) cs.addEventListener("change", apply);
    if (cc) cc.addEventListener("change", apply);
    var reset = $("#filter-reset");
    if (reset) reset.addEventListener("click", function () {
      if (cs) cs.selectedIndex = 0;
      if (cc) cc.selectedIndex = 0;
      apply();
    });
    document.addEventListener("click", function (e) {
      var t = e.target;
      if (t && t.classList && t.classList.contains("chip") && cc) {
        var c = t.getAttribute("data-concept");
        setSelect(cc, cc.value === c ? "" : c);
        apply();
      }
    });
    // ?class=NAME&concept=NAME preselects the filters (shareable links).
    var params = new URLSearchParams(window.location.search);
    if (params.has("class")) setSelect(cs, params.get("class"));
    if (params.has("concept")) setSelect(cc, params.get("concept"));
    check.filter = { "class": cs ? cs.value : "", concept: cc ? cc.value : "", shown: apply() };
    check.errors = window.__reportErrors || [];
    var out = $("#selfcheck");
    if (out) out.textContent = JSON.stringify(check);
  }

  if (document.readyState === "complete") init();
  else window.addEventListener("load", init);
})();
