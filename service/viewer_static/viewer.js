// slidepipe's viewer: the slide as deep-zoom tiles (slide.dzi) with the result's overlay
// tiles (overlay/{level}/{x}_{y}.png) over it. Every URL is relative to the page, which
// lies under a signed link; no API key is ever sent or shown.
(function () {
  "use strict";
  const status = { ready: false, loaded: { slide: 0, overlay: 0 },
                   maxLevel: { slide: -1, overlay: -1 }, failed: [], overlayVersion: 0 };
  window.slidepipeViewer = status;
  const state = { mode: "classes", enabled: new Set(), probabilityOf: 1, opacity: 0.6 };
  let viewer = null;
  let overlay = null;

  function query() {
    const q = new URLSearchParams({ mode: state.mode });
    if (state.mode === "classes") {
      q.set("classes", Array.from(state.enabled).sort().join(",") || "none");
    } else {
      q.set("class", String(state.probabilityOf));
    }
    return q.toString();
  }

  function overlaySource(info) {
    const q = query();
    return {
      width: info.overlay.width, height: info.overlay.height,
      tileSize: info.overlay.tile_px, tileOverlap: 0,
      minLevel: 0, maxLevel: info.overlay.max_level,
      getTileUrl: function (level, x, y) { return "overlay/" + level + "/" + x + "_" + y + ".png?" + q; },
    };
  }

  function showOverlay(info) {
    const options = {
      tileSource: overlaySource(info), x: 0, y: 0, width: info.overlay.viewport_width,
      opacity: state.opacity,
      success: function (event) { overlay = event.item; status.overlayVersion += 1; },
      error: function (event) { status.failed.push("overlay: " + event.message); },
    };
    if (overlay !== null) { options.index = viewer.world.getIndexOfItem(overlay); options.replace = true; }
    viewer.addTiledImage(options);
  }

  function controls(info) {
    const box = document.getElementById("classes");
    const select = document.getElementById("probability-of");
    for (const cls of info.classes) {
      state.enabled.add(cls.value);
      const label = document.createElement("label");
      label.innerHTML = '<input type="checkbox" checked> <span class="swatch"></span>';
      label.querySelector("input").dataset.value = cls.value;
      label.querySelector(".swatch").style.background = cls.color;
      label.appendChild(document.createTextNode(cls.name));
      label.querySelector("input").addEventListener("change", function (e) {
        if (e.target.checked) { state.enabled.add(cls.value); } else { state.enabled.delete(cls.value); }
        showOverlay(info);
      });
      box.appendChild(label);
      const option = document.createElement("option");
      option.value = cls.value;
      option.textContent = cls.name;
      select.appendChild(option);
    }
    state.probabilityOf = info.classes.length ? info.classes[info.classes.length - 1].value : 1;
    select.value = String(state.probabilityOf);
    select.addEventListener("change", function () {
      state.probabilityOf = Number(select.value);
      document.getElementById("legend-name").textContent = "P(" + select.selectedOptions[0].textContent + ")";
      if (state.mode === "probability") { showOverlay(info); }
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", function () {
        state.mode = radio.value;
        document.getElementById("legend").hidden = state.mode !== "probability";
        showOverlay(info);
      });
    }
    document.getElementById("ramp").style.background = "linear-gradient(to right, " + info.viridis.join(", ") + ")";
    document.getElementById("legend-name").textContent = "P(" + select.selectedOptions[0].textContent + ")";
    document.getElementById("opacity").addEventListener("input", function (e) {
      state.opacity = Number(e.target.value) / 100;
      if (overlay !== null) { overlay.setOpacity(state.opacity); }
    });
  }

  async function start() {
    const info = await (await fetch("info.json")).json();
    document.getElementById("title").textContent = info.title;
    document.getElementById("warnings").textContent = info.warnings.join("; ");
    controls(info);
    viewer = OpenSeadragon({
      id: "osd", prefixUrl: info.assets + "images/", tileSources: "slide.dzi",
      drawer: "canvas", showNavigator: true, maxZoomPixelRatio: 2, animationTime: 0.4,
    });
    status.viewer = viewer;
    viewer.addHandler("tile-loaded", function (event) {
      const which = event.tiledImage === viewer.world.getItemAt(0) ? "slide" : "overlay";
      status.loaded[which] += 1;
      status.maxLevel[which] = Math.max(status.maxLevel[which], event.tile.level);
    });
    viewer.addHandler("tile-load-failed", function (event) {
      status.failed.push(event.message + " " + (event.tile ? event.tile.getUrl() : ""));
    });
    viewer.addOnceHandler("open", function () { showOverlay(info); status.ready = true; });
    status.zoomToFullResolution = function (x, y) {
      const slide = viewer.world.getItemAt(0);
      const point = slide.imageToViewportCoordinates(x, y);
      viewer.viewport.zoomTo(slide.imageToViewportZoom(1.0), point, true);
      viewer.viewport.panTo(point, true);
    };
  }

  start().catch(function (err) { status.failed.push(String(err)); console.error(err); });
})();
