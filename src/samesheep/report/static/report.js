/* samesheep report: every page's behaviour. Data arrive as scripts (data/<key>.js calls
   samesheep.receive), because from file:// a browser refuses fetch() of local files. Every
   text from the corpus or a model is put into the page as a text node, never as markup. */
(function () {
  'use strict';
  const S = (window.samesheep = { store: {}, site: null });

  S.receive = function (key, data) { S.store[key] = data; };

  S.load = function (key) {
    return new Promise(function (resolve, reject) {
      if (Object.prototype.hasOwnProperty.call(S.store, key)) return resolve(S.store[key]);
      const el = document.createElement('script');
      el.src = 'data/' + key.split('/').map(encodeURIComponent).join('/') + '.js';
      el.onload = function () {
        if (Object.prototype.hasOwnProperty.call(S.store, key)) resolve(S.store[key]);
        else reject(new Error('the data file ' + el.src + ' did not define ' + key));
      };
      el.onerror = function () { reject(new Error('cannot load ' + el.src)); };
      document.head.appendChild(el);
    });
  };

  /* ---------------------------------------------------------------- DOM helpers */

  const CONTROLS = /[\u0000-\u0008\u000b-\u001f\u007f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  /* Control and bidirectional-override characters shown as visible marks, so that no text
     can reorder or hide what is around it. */
  function visible(text) {
    return String(text).replace(CONTROLS, function (c) {
      return '\u27e6U+' + c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0') + '\u27e7';
    });
  }
  S.visible = visible;

  function h(tag, attrs) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const k of Object.keys(attrs)) {
        const v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === 'text') el.textContent = visible(v);
        else if (k === 'class') el.className = v;
        else if (k === 'onclick') el.addEventListener('click', v);
        else if (k === 'oninput') el.addEventListener('input', v);
        else el.setAttribute(k, k === 'title' ? visible(v) : String(v));
      }
    }
    for (let i = 2; i < arguments.length; i++) add(el, arguments[i]);
    return el;
  }
  function add(el, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { add(el, c); }); return; }
    if (typeof child === 'string' || typeof child === 'number') {
      el.appendChild(document.createTextNode(visible(child)));
    } else el.appendChild(child);
  }
  S.h = h;

  /* Replace an element's children (nulls skipped). */
  function fill(el) {
    el.replaceChildren();
    for (let i = 1; i < arguments.length; i++) add(el, arguments[i]);
    return el;
  }

  function params() {
    const out = {};
    new URLSearchParams(window.location.search).forEach(function (v, k) { out[k] = v; });
    return out;
  }
  function href(page, query) {
    const q = Object.keys(query).map(function (k) {
      return encodeURIComponent(k) + '=' + encodeURIComponent(query[k]);
    });
    return page + '?' + q.join('&');
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === 'number' && !isFinite(v))) return '\u2013';
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return v.toLocaleString('en');
    return v.toLocaleString('en', { maximumSignificantDigits: digits || 3 });
  }
  function pct(v) {
    if (v === null || v === undefined || !isFinite(v)) return '\u2013';
    return (100 * v).toLocaleString('en', { maximumSignificantDigits: 3 }) + '%';
  }
  function fail(root, err) {
    fill(root, h('p', { class: 'error', text: 'This page cannot be shown: ' + err.message }));
  }
  function featureLink(sae, latent) { return href('feature.html', { sae: sae, latent: latent }); }

  /* Pair pages come in lists: "beyond" (both latents' surface r below the threshold, the
     default) and "surface" where the run has a floor, else "all". */
  const PAIR_LISTS = {
    beyond: { name: 'beyond the surface', title: 'Matched pair {n} beyond the surface' },
    surface: { name: 'surface pairs', title: 'Surface pair {n}' },
    all: { name: 'matched pairs', title: 'Matched pair {n}' },
    causal: { name: 'pairs of the causal check', title: 'Causal-check pair {n}' },
  };
  /* Each probed latent's label in the other model (compare/probes.py LABELS). */
  const PRESENCE = { shared: 'shared as a latent', spread: 'present but spread out', absent: 'absent' };
  const SHORT_PRESENCE = { shared: 'shared', spread: 'spread out', absent: 'absent' };
  function defaultList(lists) { return Object.prototype.hasOwnProperty.call(lists, 'beyond') ? 'beyond' : 'all'; }
  /* The list and rank of the page of pair `index` (into q.pairs), or null where it has none. */
  function pairPlace(q, index) {
    for (const name of Object.keys(q.lists)) {
      const rank = q.lists[name].indexOf(index);
      if (rank >= 0) return { list: name, rank: rank };
    }
    return null;
  }
  function pairLink(cmp, place) { return href('pair.html', { cmp: cmp, list: place.list, rank: place.rank }); }

  /* ---------------------------------------------------------------- highlighted text */

  const COLORS = { a: [31, 95, 191], b: [217, 130, 43] };

  /* One window: its text cut into segments [end, value], each a span whose background
     shows the activation (hover shows the value); the exemplar's token is underlined. */
  function highlighted(text, segs, max, color, center, label) {
    const out = h('span', { class: 'window' });
    let pos = 0;
    const rgb = COLORS[color] || COLORS.a;
    for (const seg of segs) {
      const end = seg[0], v = seg[1];
      const piece = text.slice(pos, end);
      const span = h('span', { class: 'tok' }, piece);
      if (v === null) {
        span.classList.add('left-out');
        span.title = (label ? label + ': ' : '') + 'left out by the token rule';
      } else if (v !== 0) {  /* activations are never negative; effects can be (shaded by size) */
        const a = Math.min(1, Math.abs(v) / (max || Math.abs(v))) * 0.8 + 0.12;
        span.style.backgroundColor = 'rgba(' + rgb.join(',') + ',' + a.toFixed(3) + ')';
        span.classList.add('on');
        span.title = (label ? label + ': ' : '') + fmt(v);
        span.dataset.value = String(v);
      }
      if (center && pos < center[1] && end > center[0]) span.classList.add('center');
      out.appendChild(span);
      pos = end;
    }
    if (pos < text.length) out.appendChild(h('span', { class: 'tok' }, text.slice(pos)));
    return out;
  }

  /* ---------------------------------------------------------------- small SVG plots */

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const k of Object.keys(attrs || {})) el.setAttribute(k, String(attrs[k]));
    return el;
  }
  function histogramPlot(counts, edges) {
    const w = 420, hgt = 150, left = 44, bottom = 28, top = 8;
    const root = svg('svg', { viewBox: '0 0 ' + w + ' ' + hgt, width: w, height: hgt, class: 'plot' });
    const maxc = Math.max(1, Math.max.apply(null, counts));
    const bw = (w - left - 8) / counts.length;
    counts.forEach(function (c, i) {
      const bh = (hgt - top - bottom) * Math.sqrt(c / maxc);
      const r = svg('rect', { x: left + i * bw, y: hgt - bottom - bh, width: Math.max(bw - 1, 1), height: bh, fill: '#1f5fbf' });
      const t = svg('title', {});
      t.textContent = fmt(c) + ' tokens with activation ' + fmt(edges[i]) + '\u2013' + fmt(edges[i + 1]);
      r.appendChild(t);
      root.appendChild(r);
    });
    [0, Math.floor(counts.length / 2), counts.length].forEach(function (i) {
      const t = svg('text', { x: left + i * bw, y: hgt - 10, 'text-anchor': 'middle', class: 'tick' });
      t.textContent = fmt(edges[Math.min(i, edges.length - 1)], 2);
      root.appendChild(t);
    });
    const lab = svg('text', { x: 12, y: hgt / 2, class: 'label', transform: 'rotate(-90 12 ' + hgt / 2 + ')', 'text-anchor': 'middle' });
    lab.textContent = '\u221a tokens';
    root.appendChild(lab);
    return root;
  }

  /* ---------------------------------------------------------------- the feature page */

  function statsTable(rows) {
    return h('table', { class: 'stats' }, rows.map(function (r) {
      return h('tr', null, h('th', null, r[0]), h('td', null, r[1]));
    }));
  }
  function listTable(title, rows, valueName) {
    if (!rows || !rows.length) return null;
    return h('div', { class: 'list' }, h('h3', null, title),
      h('table', { class: 'small' }, h('thead', null, h('tr', null, h('th', null, 'token'), h('th', null, valueName))),
        h('tbody', null, rows.map(function (r) {
          return h('tr', null, h('td', { class: 'mono' }, h('span', { class: 'tokbox' }, r[0])), h('td', null, fmt(r[1])));
        }))));
  }

  function exemplarList(windows, max, showBin) {
    return h('ol', { class: 'exemplars' }, windows.map(function (w) {
      return h('li', null,
        h('div', { class: 'meta' },
          h('span', { class: 'value' }, fmt(w.value)),
          showBin ? h('span', { class: 'bin' }, 'bin ' + (w.bin + 1)) : null,
          h('span', { class: 'title' }, w.title), h('span', { class: 'split' }, w.split)),
        highlighted(w.text, w.seg, max, 'a', w.center, null));
    }));
  }

  /* "llama0's untrained copy" for the source "random:<llama0's source>" */
  function untrainedName(source) {
    for (const key of Object.keys(S.site.saes)) {
      if ('random:' + S.site.saes[key].model === source) return S.site.saes[key].name + '\u2019s untrained copy';
    }
    return source;
  }

  function surfaceTag(surface, t) {
    return h('span', { class: 'tag ' + (surface ? 'surface' : 'beyond') },
      surface ? 'a surface latent (r \u2265 ' + t + ')' : 'beyond the surface (r < ' + t + ')');
  }

  /* `top`: an element near the head of the page that gets the latent's surface score */
  function partnerSection(sae, latent, top) {
    const box = h('div', { class: 'partners' }, h('h2', null, 'Partners in the other models'));
    const comps = Object.keys(S.site.comparisons).filter(function (k) {
      const c = S.site.comparisons[k];
      return c.a === sae || c.b === sae;
    });
    if (!comps.length) { box.appendChild(h('p', { text: 'This run compares no other model with this one.' })); return box; }
    comps.forEach(function (k) {
      const c = S.site.comparisons[k];
      const side = c.a === sae ? 'a' : 'b';
      const other = side === 'a' ? c.b : c.a;
      const sec = h('div', { class: 'partner-block' }, h('p', { class: 'loading', text: 'Loading partners…' }));
      box.appendChild(sec);
      Promise.all([S.load('p/' + k), S.load('i/' + other), S.load('q/' + k)]).then(function (got) {
        const p = got[0][side], idx = got[1], q = got[2];
        const n = p.latent.indexOf(latent);
        if (n < 0) throw new Error('latent ' + latent + ' is not in the comparison');
        const name = S.site.saes[other].name;
        function row(what, j, r) {
          if (j === null || j === undefined || j < 0) return h('tr', null, h('th', null, what), h('td', { text: '\u2013' }));
          return h('tr', null, h('th', null, what),
            h('td', null, h('a', { href: featureLink(other, j) }, name + ' #' + j), ' ',
              h('span', { class: 'r' }, r === undefined ? '' : 'r = ' + fmt(r)), ' ',
              h('span', { class: 'label' }, idx.label[j] || '')));
        }
        const col = side === 'a' ? 0 : 1;
        const index = q.pairs.findIndex(function (pr) { return pr[col] === latent; });
        const place = index >= 0 ? pairPlace(q, index) : null;
        const rows = [
          row('best partner' + (p.mutual[n] ? ' (mutual)' : ''), p.partner[n], p.r[n]),
        ];
        if (p.crossfit_r) rows.push(row('best partner, cross-fitted', p.crossfit_partner[n], p.crossfit_r[n]));
        rows.push(row('runner-up', p.runner_up[n], p.r_runner_up[n]));
        if (p.partner_residual) rows.push(row('best beyond the unit\u2019s text', p.partner_residual[n], p.r_residual[n]));
        if (p.partner_by_meaning) rows.push(row('nearest by meaning', p.partner_by_meaning[n], undefined));
        const mine = S.site.saes[sae].name;
        function plain(what, j, r, where) {
          return h('tr', null, h('th', null, what), h('td', null,
            j === null || j === undefined || j < 0 ? '\u2013' : [h('span', { class: 'r' }, 'r = ' + fmt(r)), ' (#' + j + ' of ' + where + ')']));
        }
        const scale = [];
        if (p.floor_r) scale.push(plain('fixed-source floor: against ' + name + '\u2019s untrained copy', p.floor_partner[n], p.floor_r[n], 'the SAE of ' + name + '\u2019s untrained copy'));
        if (p.ceiling_r) scale.push(plain('seed ceiling: against a second SAE on ' + mine, p.ceiling_partner[n], p.ceiling_r[n], 'the second-seed SAE'));
        if (p.surface_r) {
          const r = p.surface_r[n], t = c.surface_r || 0.5, where = 'the SAE of ' + untrainedName(p.surface_model[n]);
          scale.push(h('tr', { class: 'surface-row' }, h('th', null, 'surface score: best r in either untrained copy\u2019s SAE'),
            h('td', null, h('span', { class: 'r' }, 'r = ' + fmt(r)), ' (#' + p.surface_partner[n] + ' of ' + where + ') ', surfaceTag(p.surface[n], t))));
          if (top && !top.hasChildNodes() && p.fires[n] > 0) {
            fill(top, h('span', { class: 'tag' }, 'surface score'), ' ', surfaceTag(p.surface[n], t),
              ' best r = ' + fmt(r) + ' against #' + p.surface_partner[n] + ' of ' + where + '; partners and scale below.');
          }
        }
        const probes = [];
        if (p.presence && p.presence[n]) {
          const r2 = function (v) { return v === null || v === undefined ? '\u2013' : fmt(v); };
          probes.push(h('tr', { class: 'presence-row' }, h('th', null, 'in ' + name),
            h('td', null, h('span', { class: 'presence ' + p.presence[n] }, PRESENCE[p.presence[n]]))));
          probes.push(h('tr', null, h('th', null, 'R\u00b2 from ' + name + '\u2019s hidden state'), h('td', null, r2(p.probe_r2[n]))));
          probes.push(h('tr', null, h('th', null, 'R\u00b2 from its untrained copy\u2019s (floor)'), h('td', null, r2(p.probe_r2_floor[n]))));
          probes.push(h('tr', null, h('th', null, 'R\u00b2 from both'), h('td', null, r2(p.probe_r2_both[n]))));
          probes.push(h('tr', null, h('th', null, 'conditional R\u00b2: what ' + name + ' adds to its untrained copy'),
            h('td', null, r2(p.probe_conditional_r2[n]), ' (null: ' + r2(p.probe_null_conditional_r2[n]) + ')')));
        }
        fill(sec,
          h('h3', null, 'in ' + name),
          p.too_rare[n] ? h('p', { class: 'note', text: 'Too rare to judge: fires on ' + fmt(p.fires[n]) + ' aligned units.' }) : null,
          h('table', { class: 'stats' }, rows),
          scale.length ? h('h4', null, 'Against the floor, the ceiling and the surface') : null,
          scale.length ? h('table', { class: 'stats scale' }, scale) : null,
          probes.length ? h('h4', null, 'Probes of ' + name + '\u2019s hidden state') : null,
          probes.length ? h('table', { class: 'stats probes' }, probes) : null,
          probes.length ? h('p', { class: 'note', text: 'Ridge probes fitted on the training documents, R\u00b2 on the held-out ones. The conditional R\u00b2 (both minus the untrained copy alone) is what ' + name + ' knows of this latent beyond the surface; its null is the same probes on units shifted within documents.' }) : null,
          p.crossfit_r ? h('p', { class: 'note', text: 'Cross-fitted: the partner chosen on one half of the documents and its r measured on the other.' }) : null,
          place ? h('p', null, h('a', { href: pairLink(k, place) }, 'see this matched pair side by side'),
            ' (' + PAIR_LISTS[place.list].name + ')') : null);
      }).catch(function (e) { fail(sec, e); });
    });
    return box;
  }

  function explanationTable(rows) {
    if (!rows || !rows.length) return null;
    return h('div', { class: 'explanations' },
      h('h3', null, 'Labels and their scores'),
      h('p', { class: 'note', text: 'Each label judged on windows the explainer never saw: detection (can a scorer tell windows where the latent fires from windows where it does not, given the label) and fuzzing (can it tell the truly firing tokens from as many others), as balanced accuracy: 0.5 is chance. Another latent’s label is the baseline; an explanation scored on the best partner in the other model should keep its score where the feature is shared.' }),
      h('div', { class: 'scroll' }, h('table', { class: 'numbers' },
        h('thead', null, h('tr', null, ['label by', 'label', 'detection', 'fuzzing', 'scored on', 'windows'].map(function (t) { return h('th', t === 'label' ? { class: 'left' } : null, t); }))),
        h('tbody', null, rows.map(function (r) {
          return h('tr', null, h('td', null, r.by), h('td', { class: 'label left' }, r.label), h('td', null, fmt(r.detection)), h('td', null, fmt(r.fuzzing)),
            h('td', null, r.on ? r.on + ' (partner, r = ' + fmt(r.r) + ')' : 'this latent'), h('td', null, fmt(r.n)));
        })))));
  }

  function featurePage(root) {
    const q = params();
    const sae = q.sae, latent = parseInt(q.latent, 10);
    const info = S.site.saes[sae];
    if (!info || !(latent >= 0)) return fail(root, new Error('no such latent (the address names ' + JSON.stringify(q) + ')'));
    const block = Math.floor(latent / info.block);
    S.load('i/' + sae).then(function (idx) {
      if (latent >= idx.d_sae) throw new Error(info.name + ' has ' + idx.d_sae + ' latents');
      return Promise.all([idx, S.load('f/' + sae + '/' + block)]);
    }).then(function (got) {
      const idx = got[0], rec = got[1][String(latent)];
      document.title = info.name + ' #' + latent + ' \u00b7 samesheep';
      const nav = h('p', { class: 'nav' },
        latent > 0 ? h('a', { href: featureLink(sae, latent - 1) }, '\u2190 #' + (latent - 1)) : null, ' ',
        latent + 1 < idx.d_sae ? h('a', { href: featureLink(sae, latent + 1) }, '#' + (latent + 1) + ' \u2192') : null);
      const head = h('h1', null, info.name + ' layer ' + info.layer + ' \u00b7 latent ' + latent);
      if (!rec) {
        fill(root, nav, head, h('p', { class: 'note', text: 'A dead latent: it never fires on the stored tokens.' }), partnerSection(sae, latent, null));
        return;
      }
      const ex = rec.exemplars;
      const surfaceLine = h('p', { class: 'label-line surface-line' });
      const parts = [nav, head,
        h('p', { class: 'label-line' }, h('span', { class: 'tag' }, 'statistical label'), ' ', h('span', { class: 'label' }, rec.label || '(none)')),
        idx.llm && idx.llm[latent] ? h('p', { class: 'label-line' }, h('span', { class: 'tag' }, 'explanation'), ' ', h('span', { class: 'label explanation' }, idx.llm[latent])) : null,
        surfaceLine,
        explanationTable(rec.explanations),
        h('div', { class: 'columns' },
          h('div', null, statsTable([
            ['frequency (train / held-out)', pct(rec.freq_train) + ' / ' + pct(rec.freq_heldout)],
            ['tokens it fires on', fmt(rec.fires_train) + ' train, ' + fmt(rec.fires_heldout) + ' held-out'],
            ['activation (mean / max)', fmt(rec.mean) + ' / ' + fmt(rec.max)],
            ['documents it fires in', fmt(rec.docs)],
            ['mass on its top token', pct(rec.concentration)],
            ['mass in its top document', pct(rec.doc_concentration)],
            ['topic', rec.topic ? rec.topic + ' (' + pct(rec.topic_share) + ' of its mass, lift ' + fmt(rec.topic_lift) + ')' : '\u2013'],
            ['embedding coherence', fmt(rec.coherence) + ' (0: no more alike than random windows)'],
            ['dense', rec.dense ? 'yes (fires on over 10% of tokens)' : 'no'],
          ]), h('h3', null, 'Activation histogram'), histogramPlot(rec.hist, idx.edges)),
          h('div', null,
            rec.terms && rec.terms.length ? listTable('Label evidence (log-odds z)', rec.terms, 'z') : null,
            listTable('Top tokens (share of its mass)', rec.tokens, 'share'),
            listTable('Titles it fires on most', rec.titles, 'share'))),
        h('div', { class: 'columns' },
          listTable('Promoted output tokens (logit lens)', rec.promoted, 'logit'),
          listTable('Suppressed output tokens', rec.suppressed, 'logit')),
        h('h2', null, 'Top exemplars'),
        h('p', { class: 'note', text: 'The windows around its largest activations (at most two per document); each token shaded by its activation, the exemplar\u2019s token underlined. Hover a token for its value.' }),
        exemplarList(ex.top, rec.max, false),
        ex.quantile.length ? h('h2', null, 'Across the activation range') : null,
        ex.quantile.length ? exemplarList(ex.quantile, rec.max, true) : null,
        partnerSection(sae, latent, surfaceLine)];
      fill(root, parts);
    }).catch(function (e) { fail(root, e); });
  }

  /* ---------------------------------------------------------------- the pair page */

  function pairPage(root) {
    const q = params();
    const c = S.site.comparisons[q.cmp];
    if (!c) return fail(root, new Error('no such comparison'));
    Promise.all([S.load('q/' + q.cmp), S.load('i/' + c.a), S.load('i/' + c.b)]).then(function (got) {
      const Q = got[0], ia = got[1], ib = got[2];
      let list = Object.prototype.hasOwnProperty.call(Q.lists, q.list) ? q.list : defaultList(Q.lists);
      /* no list named and none of the pairs lies beyond the surface: the surface pairs, said so */
      const noneBeyond = !q.list && list === 'beyond' && !Q.lists.beyond.length && Q.lists.surface.length > 0;
      if (noneBeyond) list = 'surface';
      let rank = parseInt(q.rank, 10);
      if (q.a !== undefined && q.b !== undefined && !(rank >= 0)) {
        const index = Q.pairs.findIndex(function (p) { return p[0] === +q.a && p[1] === +q.b; });
        const place = index >= 0 ? pairPlace(Q, index) : null;
        if (!place) throw new Error('this pair has no page');
        list = place.list; rank = place.rank;
      }
      if (!(rank >= 0)) rank = 0;
      const members = Q.lists[list];
      const na = S.site.saes[c.a].name, nb = S.site.saes[c.b].name;
      const t = c.surface_r || 0.5;
      const tabs = Object.keys(Q.lists).length > 1 ? h('p', { class: 'tabs' }, Object.keys(Q.lists).map(function (name) {
        return [h('a', { href: href('pair.html', { cmp: q.cmp, list: name, rank: 0 }), class: name === list ? 'here' : null },
          PAIR_LISTS[name].name + ' (' + Q.lists[name].length.toLocaleString('en') + ')'), ' '];
      })) : null;
      const what = list === 'beyond'
        ? h('p', { class: 'note list-note', text: 'Pairs beyond the surface: neither latent has a partner with r \u2265 ' + t + ' in the SAE of either model\u2019s untrained copy, so the surface text alone does not make them. Ranked by r.' })
        : list === 'surface'
          ? h('p', { class: 'note list-note surface', text: 'Surface pairs: at least one of the two latents has a partner with r \u2265 ' + t + ' in the SAE of an untrained copy, which reads the same text with no training. Ranked by r.' })
          : list === 'causal'
            ? h('p', { class: 'note list-note', text: 'The mutual pairs the causal check sampled (stratified by firing frequency), highest causal agreement first.' })
            : null;
      if (!members.length) {
        fill(root, tabs, h('h1', null, 'No matched pair ' + PAIR_LISTS[list].name), what,
          h('p', { text: list === 'beyond' ? 'Every matched pair with a page has at least one latent that an untrained copy\u2019s SAE already holds.' : 'No matched pair of this list has a page.' }));
        return;
      }
      if (rank >= members.length) throw new Error('this pair has no page (pairs with pages in this list: ' + members.length + ')');
      return S.load('pp/' + q.cmp + '/' + list + '/' + Math.floor(rank / c.pair_block)).then(function (block) {
        const p = block[String(rank)];
        document.title = na + ' #' + p.a + ' / ' + nb + ' #' + p.b + ' \u00b7 samesheep';
        const nav = h('p', { class: 'nav' },
          rank > 0 ? h('a', { href: href('pair.html', { cmp: q.cmp, list: list, rank: rank - 1 }) }, '\u2190 better pair') : null, ' ',
          rank + 1 < members.length ? h('a', { href: href('pair.html', { cmp: q.cmp, list: list, rank: rank + 1 }) }, 'next pair \u2192') : null);
        const windows = p.windows.map(function (w) {
          return h('li', null,
            h('div', { class: 'meta' }, h('span', { class: 'title' }, w.title), h('span', { class: 'split' }, w.split),
              h('span', { class: 'from' }, 'a top exemplar of ' + (w.from === 'a' ? na : nb))),
            h('div', { class: 'row' }, h('span', { class: 'who a' }, na), highlighted(w.text, w.a, ia.max[p.a], 'a', w.from === 'a' ? w.center : null, na + ' #' + p.a)),
            h('div', { class: 'row' }, h('span', { class: 'who b' }, nb), highlighted(w.text, w.b, ib.max[p.b], 'b', w.from === 'b' ? w.center : null, nb + ' #' + p.b)));
        });
        function surfaceCell(r) {
          if (r === null || r === undefined) return null;
          return h('td', { class: 'surface-r' }, 'surface r = ' + fmt(r));
        }
        let effects = null;
        if (p.causal) {
          const e = p.causal;
          effects = h('section', { class: 'effects' },
            h('h2', null, 'What the two latents do: the causal check'),
            h('p', null, 'Causal agreement r = ' + fmt(e.agreement) + ' over ' + fmt(e.units) + ' units (floor: against a random latent of ' + nb + ' of the same frequency, r = ' + fmt(e.floor) +
              '; ceiling: against the partner in a second-seed SAE of ' + na + ', r = ' + fmt(e.ceiling) + '): ', h('strong', { class: 'causal-label' }, e.label), '.'),
            h('p', { class: 'note', text: 'Each latent\u2019s decoder contribution removed wherever it fires in its model (held-out text); the text after each unit where either fires is shaded by the size of the change in its log-probability, summed over the model\u2019s tokens there, each row against its own largest change (hover for the signed value: negative means the text became less likely).' }),
            h('ol', { class: 'exemplars pair effects' }, e.windows.map(function (w) {
              return h('li', null,
                h('div', { class: 'row' }, h('span', { class: 'who a' }, na), highlighted(w.text, w.a, w.max_a, 'a', null, 'change in log-probability, ' + na + ' #' + p.a + ' removed')),
                h('div', { class: 'row' }, h('span', { class: 'who b' }, nb), highlighted(w.text, w.b, w.max_b, 'b', null, 'change in log-probability, ' + nb + ' #' + p.b + ' removed')));
            })));
        }
        fill(root, tabs, nav,
          h('h1', null, PAIR_LISTS[list].title.replace('{n}', rank + 1) + ': r = ' + fmt(p.r) + (p.mutual ? ' (mutual best partners)' : '')),
          noneBeyond ? h('p', { class: 'note none-beyond', text: 'No matched pair with a page lies beyond the surface, so the surface pairs are shown.' }) : null,
          what,
          h('table', { class: 'stats' },
            h('tr', null, h('th', null, h('a', { href: featureLink(c.a, p.a) }, na + ' #' + p.a)), surfaceCell(p.surface_a), h('td', null, ia.label[p.a] || ''),
              h('td', { class: 'explanation' }, ia.llm ? ia.llm[p.a] || '' : '')),
            h('tr', null, h('th', null, h('a', { href: featureLink(c.b, p.b) }, nb + ' #' + p.b)), surfaceCell(p.surface_b), h('td', null, ib.label[p.b] || ''),
              h('td', { class: 'explanation' }, ib.llm ? ib.llm[p.b] || '' : ''))),
          h('p', { class: 'note', text: 'The same characters, each model\u2019s tokens shaded by its latent\u2019s activation (hover for the value): where both fire on the same words, the two rows light up together.' }),
          h('ol', { class: 'exemplars pair' }, windows), effects);
      });
    }).catch(function (e) { fail(root, e); });
  }

  /* ---------------------------------------------------------------- the latent table */

  function latentsPage(root) {
    const q = params();
    const c = S.site.comparisons[q.cmp];
    if (!c) return fail(root, new Error('no such comparison'));
    const na = S.site.saes[c.a].name, nb = S.site.saes[c.b].name;
    Promise.all([S.load('p/' + q.cmp), S.load('q/' + q.cmp), S.load('i/' + c.a), S.load('i/' + c.b)]).then(function (got) {
      const P = got[0], Q = got[1], I = { a: got[2], b: got[3] };
      const rows = [];
      ['a', 'b'].forEach(function (side) {
        const p = P[side], idx = I[side], other = side === 'a' ? 'b' : 'a';
        for (let n = 0; n < p.latent.length; n++) {
          const i = p.latent[n];
          rows.push({
            side: side, model: side === 'a' ? na : nb, latent: i, label: idx.label[i] || '', freq: idx.freq[i],
            partner: p.partner[n], r: p.too_rare[n] ? null : p.r[n], rres: p.r_residual ? (p.too_rare[n] ? null : p.r_residual[n]) : null,
            mutual: p.mutual[n], topic: idx.topic[i] || '', dead: idx.dead[i], rare: p.too_rare[n],
            plabel: I[other].label[p.partner[n]] || '', token: idx.token[i] || '', llm: idx.llm ? idx.llm[i] || '' : '',
            surface: p.surface ? p.surface[n] : null, sr: p.surface_r && !idx.dead[i] ? p.surface_r[n] : null,
            presence: p.presence ? p.presence[n] : '', cr2: p.probe_conditional_r2 ? p.probe_conditional_r2[n] : null,
          });
        }
      });
      const lists = {
        all: { name: 'every latent', filter: function () { return true; } },
        shared: { name: 'shared (a matched partner with r \u2265 0.5)', filter: null },
        'only-a': { name: 'only in ' + na + ' (best partner r < 0.3)', filter: function (r) { return r.side === 'a' && !r.rare && !r.dead && r.r !== null && r.r < 0.3; } },
        'only-b': { name: 'only in ' + nb + ' (best partner r < 0.3)', filter: function (r) { return r.side === 'b' && !r.rare && !r.dead && r.r !== null && r.r < 0.3; } },
      };
      const which = lists[q.list] ? q.list : 'all';
      const tabs = h('p', { class: 'tabs' }, Object.keys(lists).map(function (k) {
        const query = { cmp: q.cmp, list: k };
        if (q.surface === 'surface' || q.surface === 'beyond') query.surface = q.surface;
        return [h('a', { href: href('latents.html', query), class: k === which ? 'here' : null }, lists[k].name), ' '];
      }));
      const search = h('input', { type: 'search', placeholder: 'search labels, tokens, topics\u2026', class: 'search', 'aria-label': 'search' });
      const count = h('span', { class: 'count' });
      const body = h('tbody');
      const more = h('button', { type: 'button', class: 'more' }, 'show more');
      let shown = 200, sortKey = which === 'shared' ? 'r' : (which === 'all' ? 'latent' : 'freq'), sortDir = which === 'all' ? 1 : -1;
      let data;
      const rowA = {};
      P.a.latent.forEach(function (latent, n) { rowA[latent] = n; });
      if (which === 'shared') {
        data = [];
        Q.pairs.forEach(function (p, index) {
          if (p[2] === null || p[2] < 0.5) return;
          const n = rowA[p[0]];
          data.push({ side: 'a', model: na, latent: p[0], label: I.a.label[p[0]] || '', freq: I.a.freq[p[0]], partner: p[1], r: p[2],
            rres: null, mutual: p[3], topic: I.a.topic[p[0]] || '', plabel: I.b.label[p[1]] || '', token: I.a.token[p[0]] || '', index: index,
            llm: I.a.llm ? I.a.llm[p[0]] || '' : '', surface: p[4] === null ? null : !p[4],
            sr: P.a.surface_r && n !== undefined ? P.a.surface_r[n] : null,
            presence: P.a.presence && n !== undefined ? P.a.presence[n] : '',
            cr2: P.a.probe_conditional_r2 && n !== undefined ? P.a.probe_conditional_r2[n] : null });
        });
      } else data = rows.filter(lists[which].filter);
      /* the surface filter: latents an untrained copy's SAE already holds (surface r at or
         above the threshold), or the rest; in the shared list, a pair is beyond the surface
         where both its latents are */
      const hasSurface = !!P.a.surface;
      const t = c.surface_r || 0.5;
      const surfaces = {
        '': 'all',
        surface: which === 'shared' ? 'surface pairs (either latent\u2019s surface r \u2265 ' + t + ')' : 'surface latents (surface r \u2265 ' + t + ')',
        beyond: which === 'shared' ? 'pairs beyond the surface (both below ' + t + ')' : 'beyond the surface (surface r < ' + t + ')',
      };
      const surf = hasSurface && (q.surface === 'surface' || q.surface === 'beyond') ? q.surface : '';
      if (surf) data = data.filter(function (r) { return r.sr !== null && r.surface === (surf === 'surface'); });
      const surfaceTabs = hasSurface ? h('p', { class: 'tabs surface-filter' }, h('span', { class: 'filter-label' }, 'surface: '), Object.keys(surfaces).map(function (k) {
        const query = { cmp: q.cmp, list: which };
        if (k) query.surface = k;
        return [h('a', { href: href('latents.html', query), class: k === surf ? 'here' : null }, surfaces[k]), ' '];
      })) : null;
      /* the presence filter: shared as a latent, present but spread out, or absent in the
         other model (conditional probes; latents not probed have none) */
      const hasPresence = !!P.a.presence;
      const pres = hasPresence && Object.prototype.hasOwnProperty.call(PRESENCE, q.presence) ? q.presence : '';
      if (pres) data = data.filter(function (r) { return r.presence === pres; });
      const presenceTabs = hasPresence ? h('p', { class: 'tabs presence-filter' }, h('span', { class: 'filter-label' }, 'in the other model: '),
        [''].concat(Object.keys(PRESENCE)).map(function (k) {
          const query = { cmp: q.cmp, list: which };
          if (surf) query.surface = surf;
          if (k) query.presence = k;
          return [h('a', { href: href('latents.html', query), class: k === pres ? 'here' : null }, k ? PRESENCE[k] : 'all'), ' '];
        })) : null;
      const explained = !!(I.a.llm || I.b.llm);
      const cols = [['model', 'model'], ['latent', '#'], ['label', 'label']].concat(explained ? [['llm', 'explanation']] : []).concat([
        ['freq', 'frequency'], ['partner', 'best partner'], ['r', 'r'], ['rres', 'r beyond text']]).concat(
        hasSurface ? [['sr', 'surface r']] : []).concat(hasPresence ? [['presence', 'other model']] : []).concat(
        [['mutual', 'mutual'], ['topic', 'topic']]);
      const head = h('tr', null, cols.map(function (col) {
        return h('th', { class: 'sortable', onclick: function () {
          if (sortKey === col[0]) sortDir = -sortDir; else { sortKey = col[0]; sortDir = (col[0] === 'label' || col[0] === 'llm' || col[0] === 'model' || col[0] === 'topic') ? 1 : -1; }
          shown = 200; draw();
        } }, col[1]);
      }));
      function cmp(x, y) {
        const a = x[sortKey], b = y[sortKey];
        if (a === b) return x.latent - y.latent;
        if (a === null || a === undefined) return 1;
        if (b === null || b === undefined) return -1;
        return (a < b ? -1 : 1) * sortDir;
      }
      function draw() {
        const needle = search.value.trim().toLowerCase();
        const hits = needle ? data.filter(function (r) {
          return (r.label + ' ' + r.llm + ' ' + r.plabel + ' ' + r.topic + ' ' + r.token).toLowerCase().indexOf(needle) >= 0 || String(r.latent) === needle;
        }) : data.slice();
        hits.sort(cmp);
        count.textContent = hits.length.toLocaleString('en') + ' latents';
        fill(body, hits.slice(0, shown).map(function (r) {
          const mine = r.side === 'a' ? c.a : c.b, other = r.side === 'a' ? c.b : c.a;
          const place = which === 'shared' ? pairPlace(Q, r.index) : null;
          const pairA = place ? h('a', { href: pairLink(q.cmp, place), class: 'pairlink' }, 'side by side') : null;
          return h('tr', null, h('td', null, r.model), h('td', null, h('a', { href: featureLink(mine, r.latent) }, String(r.latent))),
            h('td', { class: 'label', title: r.label }, r.label), explained ? h('td', { class: 'label explanation', title: r.llm }, r.llm) : null, h('td', null, pct(r.freq)),
            h('td', null, r.partner === null || r.partner < 0 ? '\u2013' : h('a', { href: featureLink(other, r.partner), title: r.plabel }, String(r.partner)), ' ', pairA),
            h('td', null, fmt(r.r)), h('td', null, fmt(r.rres)), hasSurface ? h('td', { class: r.surface ? 'surface' : null }, fmt(r.sr)) : null,
            hasPresence ? h('td', { class: 'presence ' + (r.presence || 'none'), title: r.presence ? PRESENCE[r.presence] + ', conditional R\u00b2 = ' + fmt(r.cr2) : null }, SHORT_PRESENCE[r.presence] || '\u2013') : null,
            h('td', null, r.mutual ? 'yes' : ''), h('td', null, r.topic));
        }));
        more.hidden = hits.length <= shown;
      }
      search.addEventListener('input', function () { shown = 200; draw(); });
      more.addEventListener('click', function () { shown += 500; draw(); });
      fill(root, h('h1', null, na + ' and ' + nb + ': ' + lists[which].name + (surf ? ', ' + surfaces[surf] : '') + (pres ? ', ' + PRESENCE[pres] + ' in the other model' : '')), tabs, surfaceTabs, presenceTabs,
        h('p', null, search, ' ', count), h('div', { class: 'scroll' }, h('table', { class: 'latents' }, h('thead', null, head), body)), more);
      draw();
    }).catch(function (e) { fail(root, e); });
  }

  /* ---------------------------------------------------------------- the map */

  function drawMap(box) {
    const key = box.dataset.cmp;
    const c = S.site.comparisons[key];
    const canvas = box.querySelector('canvas'), tip = box.querySelector('.tip');
    Promise.all([S.load('m/' + key), S.load('i/' + c.a), S.load('i/' + c.b)]).then(function (got) {
      const m = got[0], I = { a: got[1], b: got[2] };
      const ctx = canvas.getContext('2d');
      const W = canvas.width, H = canvas.height, pad = 12;
      const pts = [];
      const where = { a: {}, b: {} };
      ['a', 'b'].forEach(function (side) {
        m[side].forEach(function (p) {
          const x = pad + p[1] * (W - 2 * pad), y = pad + (1 - p[2]) * (H - 2 * pad);
          pts.push({ side: side, latent: p[0], x: x, y: y });
          where[side][p[0]] = [x, y];
        });
      });
      ctx.clearRect(0, 0, W, H);
      ctx.strokeStyle = 'rgba(60,60,60,0.25)';
      ctx.lineWidth = 0.6;
      m.links.forEach(function (l) {
        const p = where.a[l[0]], q = where.b[l[1]];
        if (!p || !q) return;
        ctx.beginPath(); ctx.moveTo(p[0], p[1]); ctx.lineTo(q[0], q[1]); ctx.stroke();
      });
      pts.forEach(function (p) {
        ctx.fillStyle = p.side === 'a' ? 'rgba(31,95,191,0.55)' : 'rgba(217,130,43,0.55)';
        ctx.fillRect(p.x - 1.5, p.y - 1.5, 3, 3);
      });
      const cell = 10, grid = {};
      pts.forEach(function (p, i) {
        const g = Math.floor(p.x / cell) + ',' + Math.floor(p.y / cell);
        (grid[g] = grid[g] || []).push(i);
      });
      function nearest(ev) {
        const r = canvas.getBoundingClientRect();
        const x = (ev.clientX - r.left) * (W / r.width), y = (ev.clientY - r.top) * (H / r.height);
        let best = -1, bd = 49;
        for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
          (grid[(Math.floor(x / cell) + dx) + ',' + (Math.floor(y / cell) + dy)] || []).forEach(function (i) {
            const d = (pts[i].x - x) * (pts[i].x - x) + (pts[i].y - y) * (pts[i].y - y);
            if (d < bd) { bd = d; best = i; }
          });
        }
        return best >= 0 ? pts[best] : null;
      }
      canvas.addEventListener('mousemove', function (ev) {
        const p = nearest(ev);
        if (!p) { tip.hidden = true; canvas.style.cursor = 'default'; return; }
        const sae = p.side === 'a' ? c.a : c.b;
        tip.textContent = visible(S.site.saes[sae].name + ' #' + p.latent + ': ' + (I[p.side].label[p.latent] || ''));
        tip.style.left = (ev.offsetX + 12) + 'px';
        tip.style.top = (ev.offsetY + 12) + 'px';
        tip.hidden = false;
        canvas.style.cursor = 'pointer';
      });
      canvas.addEventListener('mouseleave', function () { tip.hidden = true; });
      canvas.addEventListener('click', function (ev) {
        const p = nearest(ev);
        if (p) window.location.href = featureLink(p.side === 'a' ? c.a : c.b, p.latent);
      });
    }).catch(function (e) { fail(box, e); });
  }

  /* ---------------------------------------------------------------- start */

  S.start = function (page, site) {
    S.site = site;
    const go = function () {
      if (page === 'feature.html') featurePage(document.getElementById('feature'));
      else if (page === 'pair.html') pairPage(document.getElementById('pair'));
      else if (page === 'latents.html') latentsPage(document.getElementById('latents'));
      else document.querySelectorAll('.map').forEach(drawMap);
    };
    if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', go);
    else go();
  };
})();
