// Live counters on the overview: one EventSource, closed when the page goes away.
"use strict";
(function () {
  function start() {
    var card = document.getElementById("live");
    if (!card || !window.EventSource) { return; }
    var state = card.querySelector(".live-state");
    var source = new EventSource(card.getAttribute("data-events"));
    source.addEventListener("counters", function (event) {
      var data = JSON.parse(event.data);
      if (data.error) { state.textContent = data.error; return; }
      state.textContent = "live";
      card.querySelectorAll("[data-live]").forEach(function (cell) {
        var value = data[cell.getAttribute("data-live")];
        cell.textContent = value === null || value === undefined ? "n/a" : String(value);
      });
    });
    source.onerror = function () { state.textContent = "reconnecting…"; };
    window.addEventListener("pagehide", function () { source.close(); });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
