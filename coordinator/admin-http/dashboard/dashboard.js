// The coordinator dashboard: reads /api/status and /api/ledger, follows /api/events (server-sent events), and draws
// everything with the DOM and inline SVG. Hand-written, no framework and no build step, so the file served is the
// file in the repository. Text from the server only ever goes into textContent or SVG attributes, never into markup.

const SVG = 'http://www.w3.org/2000/svg';
const STATUS_EVERY_MS = 5000;
const LEDGER_EVERY_MS = 30000;
const MAX_EVENTS = 200;
// Dice series first (mean, then per class), loss last; colour-blind-safe palette.
const COLOURS = ['#0072b2', '#e69f00', '#009e73', '#cc79a7', '#56b4e9', '#d55e00', '#f0e442', '#000000'];

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs = {}, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const short = (h) => (h ? `${h.slice(0, 12)}…` : '—');
const num = (v, digits = 3) => (typeof v === 'number' && Number.isFinite(v) ? v.toFixed(digits) : '—');

function ago(isoTime, now) {
  if (!isoTime) return 'never';
  const s = Math.max(0, Math.round((now - Date.parse(isoTime)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

async function getJson(path) {
  const res = await fetch(path, { headers: { accept: 'application/json' }, cache: 'no-store' });
  if (!res.ok) throw new Error(`${path} answered ${res.status}`);
  return res.json();
}

function showError(message) {
  const e = $('error');
  e.textContent = message ?? '';
  e.hidden = !message;
}

// ---- federation at a glance ----

let deadline; // { at: ms, skew: server now - client now }

function renderOverview(s) {
  const live = s.live;
  $('federation').textContent = `${live.plan.name} · ${s.federationId}`;
  const phase = $('phase');
  phase.textContent = live.phase;
  phase.className = `badge ${live.phase === 'finished' ? 'ok' : live.phase === 'round open' ? 'warn' : ''}`;
  phase.dataset.phase = live.phase;
  const open = live.openRound;
  deadline = open ? { at: Date.parse(open.deadlineAt), skew: Date.parse(live.now) - Date.now() } : undefined;
  const rows = [
    ['plan', `${live.plan.name}: ${live.plan.architecture}, ${live.plan.plannedRounds} rounds${live.plan.pretrainingRounds ? ` (${live.plan.pretrainingRounds} pretraining)` : ''}, quorum ${live.plan.minSites}, ${live.plan.strategy}${live.plan.serverOptimizer !== 'none' ? ` + ${live.plan.serverOptimizer}` : ''}${live.plan.secureAggregation ? ', secure aggregation' : ''}`],
    ['round', open ? `${open.round} of ${live.plan.plannedRounds} (open; ${open.reported.length} of ${open.selected.length} sites reported)` : `${s.roundsClosed} of ${live.plan.plannedRounds} closed`],
    ['phase', s.finished ? `finished at ${s.finished.at} (after the last round the coordinator ${live.afterLastRound === 'exit' ? 'exits' : 'stays up, idle'})` : live.phase],
    ['time to deadline', open ? deadlineText() : '—', 'deadline'],
    ['connected sites', live.connectedSites.length ? live.connectedSites.join(', ') : 'none'],
    ['current model', s.currentModel ?? '—', 'hash'],
    ['coordinator', `MedFL ${live.coordinatorVersion}`],
  ];
  if (s.storage) rows.push(['disk', `${bytes(s.storage.freeBytes)} free of ${bytes(s.storage.totalBytes)}${s.storage.low ? ' — LOW' : ''}`]);
  const dl = $('overview');
  dl.replaceChildren();
  for (const [k, v, id] of rows) {
    dl.append(el('dt', {}, k), el('dd', { id: id === 'deadline' ? 'deadline' : undefined, class: id === 'hash' ? 'hash' : undefined }, v));
  }
}

function deadlineText() {
  if (!deadline) return '—';
  const s = Math.round((deadline.at - (Date.now() + deadline.skew)) / 1000);
  return s <= 0 ? 'passed' : s < 120 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

setInterval(() => {
  const d = $('deadline');
  if (d && deadline) d.textContent = deadlineText();
}, 1000);

// ---- sites ----

function renderSites(s) {
  const now = Date.parse(s.live.now);
  const body = $('sites').tBodies[0];
  body.replaceChildren();
  for (const site of s.sites) {
    const proto = s.live.protocols[site.name];
    const statusClass = site.status === 'online' || site.status === 'finished' ? 'ok' : site.status === 'offline' || site.status === 'revoked' ? 'bad' : 'warn';
    const validation = site.validationCases === null ? '—' : site.validationCases === 0 ? 'no validation data' : `${site.validationCases} case${site.validationCases === 1 ? '' : 's'}`;
    body.append(
      el(
        'tr',
        { 'data-site': site.name },
        el('td', {}, site.name),
        el('td', { 'data-field': 'status' }, el('span', { class: `badge ${statusClass}` }, site.status)),
        el('td', {}, ago(site.lastSeenAt, now)),
        // The last heartbeat's activity, while the site is still connected (a site that just left was doing nothing more).
        el('td', {}, site.status === 'online' && s.live.connectedSites.includes(site.name) ? (site.activity ?? '—') : '—'),
        el('td', {}, site.engine ?? '—'),
        el('td', { 'data-field': 'version' }, site.version === 'unknown' ? el('span', { class: 'badge warn' }, 'unknown') : (site.version ?? '—')),
        el('td', {}, proto ? `v${proto.protocolVersion}${proto.features.length ? ` (${proto.features.join(', ')})` : ''}` : '—'),
        el('td', { 'data-field': 'validation' }, site.validationCases === 0 ? el('span', { class: 'badge warn' }, validation) : validation),
        el('td', { 'data-field': 'declined' }, site.tasksDeclined ? el('span', { class: 'badge warn' }, site.tasksDeclined) : 0),
        el('td', { 'data-field': 'withheld' }, site.tasksWithheld ? el('span', { class: 'badge warn' }, site.tasksWithheld) : 0),
      ),
    );
  }
}

// ---- curves ----

const W = 420;
const H = 170;
const PAD = { left: 38, right: 10, top: 10, bottom: 24 };

/** One chart: series of [round, value] points on a shared x axis (rounds 1…maxRound) and the y range given. */
function chart(site, kind, series, maxRound, yMin, yMax, yLabel) {
  const pw = W - PAD.left - PAD.right;
  const ph = H - PAD.top - PAD.bottom;
  const x = (round) => PAD.left + (maxRound <= 1 ? pw / 2 : ((round - 1) / (maxRound - 1)) * pw);
  const y = (v) => PAD.top + (1 - (v - yMin) / (yMax - yMin || 1)) * ph;
  const root = svg('svg', {
    class: 'chart',
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-label': `${yLabel} per round at ${site}`,
    'data-site': site,
    'data-kind': kind,
    'data-y-min': yMin,
    'data-y-max': yMax,
    'data-plot-top': PAD.top,
    'data-plot-height': ph,
  });
  root.append(svg('line', { class: 'axis', x1: PAD.left, y1: PAD.top + ph, x2: PAD.left + pw, y2: PAD.top + ph }));
  root.append(svg('line', { class: 'axis', x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + ph }));
  for (const v of [yMin, (yMin + yMax) / 2, yMax]) {
    root.append(svg('text', { x: PAD.left - 4, y: y(v) + 3, 'text-anchor': 'end' }, num(v, 2)));
  }
  const step = Math.max(1, Math.ceil(maxRound / 10));
  for (let r = 1; r <= maxRound; r += step) root.append(svg('text', { x: x(r), y: PAD.top + ph + 11, 'text-anchor': 'middle' }, r));
  root.append(svg('text', { x: PAD.left + pw / 2, y: H - 2, 'text-anchor': 'middle' }, 'round'));
  for (const s of series) {
    const g = svg('g', { class: 'series', 'data-metric': s.metric });
    const points = s.points.filter(([, v]) => Number.isFinite(v));
    if (points.length > 1) g.append(svg('polyline', { points: points.map(([r, v]) => `${x(r).toFixed(2)},${y(v).toFixed(2)}`).join(' '), fill: 'none', stroke: s.colour, 'stroke-width': 2 }));
    for (const [r, v] of points) {
      g.append(svg('circle', { cx: x(r).toFixed(2), cy: y(v).toFixed(2), r: 3, fill: s.colour, 'data-round': r, 'data-value': v }, svg('title', {}, `${s.label}, round ${r}: ${v}`)));
    }
    root.append(g);
  }
  return root;
}

function legend(series) {
  const l = el('div', { class: 'legend' });
  for (const s of series) {
    const sw = svg('svg', { class: 'swatch', viewBox: '0 0 10 10', width: 10, height: 10 }, svg('rect', { width: 10, height: 10, fill: s.colour }));
    l.append(el('span', {}, sw, ` ${s.label}`));
  }
  return l;
}

function renderCurves(s) {
  const bySite = new Map();
  let maxRound = 1;
  for (const m of s.metrics) {
    if (!bySite.has(m.site)) bySite.set(m.site, []);
    bySite.get(m.site).push(m);
    maxRound = Math.max(maxRound, m.round);
  }
  const box = $('curves');
  box.replaceChildren();
  if (bySite.size === 0) {
    box.append(el('p', { class: 'muted' }, 'No site has reported a round yet.'));
    return;
  }
  const noVal = new Set(s.sites.filter((x) => x.validationCases === 0).map((x) => x.name));
  for (const [site, rows] of [...bySite].sort(([a], [b]) => a.localeCompare(b))) {
    const keys = new Set(rows.flatMap((r) => Object.keys(r.values)));
    const classes = [...keys].map((k) => /^val_dice_class_(\d+)$/.exec(k)?.[1]).filter((c) => c !== undefined).map(Number).sort((a, b) => a - b);
    const metricSeries = (metric, label, colour) => ({ metric, label, colour, points: rows.filter((r) => typeof r.values[metric] === 'number').map((r) => [r.round, r.values[metric]]) });
    const dice = [metricSeries('val_dice_mean', 'mean Dice', COLOURS[0]), ...classes.map((c, i) => metricSeries(`val_dice_class_${c}`, `Dice class ${c}`, COLOURS[(i + 1) % COLOURS.length]))].filter((x) => x.points.length > 0);
    const losses = [metricSeries('train_loss', 'training loss (last step)', COLOURS[5])].filter((x) => x.points.length > 0);
    const card = el('div', { class: 'site-curves', 'data-site': site }, el('h3', {}, site));
    if (dice.length > 0) card.append(legend(dice), chart(site, 'dice', dice, maxRound, 0, 1, 'validation Dice'));
    else card.append(el('p', { class: noVal.has(site) ? 'warn' : 'muted', 'data-field': 'no-dice' }, noVal.has(site) ? 'no validation data: this site holds no validation cases, so it reports no Dice' : 'no validation Dice reported'));
    if (losses.length > 0) {
      const values = losses.flatMap((x) => x.points.map(([, v]) => v)).filter(Number.isFinite);
      const hi = Math.max(...values);
      card.append(legend(losses), chart(site, 'loss', losses, maxRound, 0, hi > 0 ? hi * 1.1 : 1, 'training loss'));
    }
    box.append(card);
  }
}

// ---- models, privacy, ledger ----

function renderModels(s) {
  const body = $('models').tBodies[0];
  body.replaceChildren();
  for (const m of [...s.models].reverse()) {
    body.append(el('tr', { 'data-model': m.hash }, el('td', {}, m.round === 0 ? '0 (initial)' : m.round), el('td', { class: 'hash', title: m.hash }, short(m.hash)), el('td', {}, bytes(m.sizeBytes)), el('td', { title: m.createdAt }, m.createdAt.replace('T', ' ').slice(0, 19))));
  }
}

function renderPrivacy(s) {
  const box = $('privacy');
  box.replaceChildren();
  const plan = s.live.privacyPlan;
  if (!plan) {
    box.append(el('p', { class: 'muted' }, 'This plan has no client-level differential privacy (aggregation.dp): no ε is spent or claimed.'));
    return;
  }
  const spent = s.privacy;
  if (plan.noiseMultiplier === 0) {
    box.append(el('p', { class: 'bad' }, `Noise multiplier 0: updates are clipped to ${plan.clipNorm} but no ε can be claimed.`));
    return;
  }
  const eps = spent?.epsilon ?? 0;
  const budget = plan.plannedEpsilon;
  // The bar's full width: the plan's budget when it has one, else what its last round will have spent.
  const limit = plan.epsilonBudget ?? budget;
  const share = limit > 0 ? Math.min(1, eps / limit) : 0;
  box.append(
    el('p', { id: 'epsilon', 'data-spent': eps, 'data-planned': budget, 'data-budget': plan.epsilonBudget ?? '' }, `ε spent ${num(eps, 2)} of ${num(budget, 2)} by the plan's last round (δ = ${plan.delta}; ${plan.roundsReleased} of ${plan.plannedRounds} rounds released; z = ${plan.noiseMultiplier}, S = ${plan.clipNorm})`),
  );
  const b = s.privacyBudget;
  if (plan.epsilonBudget !== null) {
    const fits = plan.roundsWithinBudget;
    const remaining = plan.plannedRounds - plan.roundsReleased;
    const cls = b?.exhausted ? 'bad' : fits < remaining ? 'warn' : 'ok';
    const text = b?.exhausted
      ? `privacy budget exhausted: the next round would have brought ε to ${num(b.refusedAt, 2)}, above the budget ${plan.epsilonBudget}; no further round opens`
      : `budget ε ${plan.epsilonBudget}: ${num(Math.max(0, plan.epsilonBudget - eps), 2)} left; ${fits} of the ${remaining} remaining rounds fit${fits < remaining ? ' — the federation will stop early' : ''}`;
    box.append(el('p', { id: 'epsilon-budget', 'data-exhausted': b?.exhausted ? 'true' : 'false' }, el('span', { class: `badge ${cls}` }, text)));
  }
  box.append(
    el('div', { class: 'bar' }, svg('svg', { viewBox: '0 0 100 10', preserveAspectRatio: 'none' }, svg('rect', { width: (100 * share).toFixed(2), height: 10, fill: b?.exhausted ? '#d55e00' : '#0072b2' }))),
    el('p', { class: 'muted' }, "Sites refuse rounds beyond their own policy's maxEpsilon; the plan's figure assumes its sampling rate for the rounds still to come."),
  );
}

function renderLedger(l) {
  const dl = $('ledger');
  dl.replaceChildren();
  const verdict = el('span', { class: `badge ${l.ok ? 'ok' : 'bad'}`, id: 'ledger-verdict' }, l.ok ? 'verified' : 'BROKEN');
  const rows = [
    ['verification', verdict],
    ['head', el('span', { class: 'hash', id: 'ledger-head' }, `${l.head.seq}:${l.head.hash}`)],
    ['entries', l.entries],
    ['chain', l.chain.ok ? 'hash chain, sequence and coordinator signatures check out' : l.chain.problems.map((p) => `line ${p.line}: ${p.problem}`).join('; ')],
    ['completeness', l.completeness.ok ? `each of the ${l.completeness.updates} accepted updates has exactly one entry` : l.completeness.problems.join('; ')],
    ['stored in', l.backend],
    ['checked', l.verifiedAt],
  ];
  for (const [k, v] of rows) dl.append(el('dt', {}, k), el('dd', {}, v));
}

// ---- live events ----

const seen = new Set();

function describeEvent(e) {
  const parts = [];
  if (typeof e.round === 'number') parts.push(`round ${e.round}`);
  if (typeof e.site === 'string') parts.push(e.site);
  for (const k of ['reason', 'note', 'model', 'missing']) if (e[k] !== undefined) parts.push(`${k}: ${Array.isArray(e[k]) ? e[k].join(', ') : typeof e[k] === 'string' && /^[0-9a-f]{64}$/.test(e[k]) ? short(e[k]) : e[k]}`);
  return parts.join(' · ');
}

function addEvent(e) {
  const key = e.id ?? `${e.type}:${e.at}:${e.site ?? ''}`;
  if (seen.has(key)) return;
  seen.add(key);
  const list = $('events');
  const when = typeof e.at === 'string' ? e.at.replace('T', ' ').slice(0, 19) : '';
  list.prepend(el('li', { 'data-type': e.type }, el('span', { class: 'muted' }, `${when} `), el('span', { class: 'type' }, e.type), ` ${describeEvent(e)}`));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function followEvents() {
  const state = $('events-state');
  const source = new EventSource('/api/events');
  source.onopen = () => {
    state.textContent = 'live';
    state.className = 'badge ok';
  };
  source.onerror = () => {
    // EventSource reconnects by itself (the server asks for 3 s), sending the last id it saw.
    state.textContent = 'reconnecting…';
    state.className = 'badge warn';
  };
  source.onmessage = (m) => {
    let e;
    try {
      e = JSON.parse(m.data);
    } catch {
      return;
    }
    addEvent(e);
    // What the tables show changes with these: refresh at once instead of at the next poll.
    if (/^(round|update|site|task|federation|model|teacher)\./.test(e.type)) scheduleStatus(300);
    if (e.type === 'update.accepted' || e.type === 'model.rolled_back') scheduleLedger(1000);
  };
}

// ---- refresh loop ----

let statusTimer;
let ledgerTimer;

async function refreshStatus() {
  try {
    const s = await getJson('/api/status');
    renderOverview(s);
    renderSites(s);
    renderCurves(s);
    renderModels(s);
    renderPrivacy(s);
    $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = 'status';
    showError();
  } catch (e) {
    showError(`cannot read the coordinator's status: ${e.message}`);
  }
  scheduleStatus(STATUS_EVERY_MS);
}

async function refreshLedger() {
  try {
    renderLedger(await getJson('/api/ledger'));
  } catch (e) {
    showError(`cannot read the ledger: ${e.message}`);
  }
  scheduleLedger(LEDGER_EVERY_MS);
}

function scheduleStatus(ms) {
  clearTimeout(statusTimer);
  statusTimer = setTimeout(refreshStatus, ms);
}

function scheduleLedger(ms) {
  clearTimeout(ledgerTimer);
  ledgerTimer = setTimeout(refreshLedger, ms);
}

refreshStatus();
refreshLedger();
followEvents();
