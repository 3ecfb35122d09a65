using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using OrleansIdempotency.Bench;
using OrleansIdempotency.Testing;
using static OrleansIdempotency.Bench.Statistics;

// The benchmark: the demo API's /bench/plain and /bench/idempotent endpoints under wrk, in the embedded default and
// in the durable shape (PostgreSQL with fsync on, reached through its Unix socket as on its own host, and Redis),
// interleaved round by round; medians of the rounds. New keys are also measured with PostgreSQL over TCP loopback.
//   scripts/bench.sh [--rounds N] [--seconds S] [--scale] [--memory] | --grain
// --scale adds new-key and cold-replay latency with 10,000 and 1,000,000 records stored; --memory adds the API's
// memory after 200,000 keys and after their activations are collected; --grain runs the in-process grain benchmark alone.
// A fourth process measures Orleans alone (FloorHost): the same hosting with an empty grain per key and no layer.
if (args.Contains(FloorHost.Argument))
{
    await FloorHost.RunAsync();
    return 0;
}

var rounds = Option(args, "--rounds", 3);
var seconds = TimeSpan.FromSeconds(Option(args, "--seconds", 5));
const int Connections = 64;
const int HotKeys = 256;

Console.WriteLine($"Machine: {Environment.ProcessorCount} cores, {Math.Round(GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 1e9)} GB; .NET {Environment.Version}; wrk and the server share the cores.");
if (args.Contains("--grain"))
{
    // The grain benchmark alone: in-process, no servers, under a minute.
    await PartsAsync();
    return 0;
}

await using var postgres = await PostgresServer.StartAsync(durable: true);
await using var redis = await RedisServer.StartAsync();
var durableSettings = new Dictionary<string, string>
{
    ["ConnectionStrings__Postgres"] = postgres.OverUnixSocket(await postgres.CreateDatabaseAsync()),
    ["ConnectionStrings__Redis"] = redis.ConnectionString,
    ["Orleans__ClusterId"] = "bench",
};
var overTcpSettings = new Dictionary<string, string>(durableSettings)
{
    ["ConnectionStrings__Postgres"] = await postgres.CreateDatabaseAsync(),
    ["Orleans__ClusterId"] = "bench-tcp",
};
var embedded = new Shape("embedded", Start("embedded", new Dictionary<string, string>()));
var durable = new Shape("durable", Start("durable", durableSettings));
var overTcp = new Shape("durable, PostgreSQL over TCP", Start("durable-tcp", overTcpSettings), NewKeysOnly: true);
var orleansAlone = new Shape("embedded, Orleans alone (empty grain per key)", Start("floor", new Dictionary<string, string>(), FloorHost.Argument), NewKeysOnly: true, NewKeyPath: FloorHost.FloorPath);
var shapes = new[] { embedded, durable, overTcp, orleansAlone };
Shape[][] rotation = [[embedded, orleansAlone], [durable], [overTcp]];
var counts = Directory.CreateTempSubdirectory("orleans-idempotency-bench-").FullName;
ChildProcesses.TrackDirectory(counts);
var results = new List<(string Shape, string Scenario, int Connections, WrkResult Result, double Ratio, double ApiCpuUs, double PostgresCpuUs, int Round)>();
var currentRound = 0;
var leftOut = new List<string>();
try
{
    foreach (var shape in shapes)
    {
        await WaitForHealthAsync(shape.Api);
        if (!shape.NewKeysOnly)
        {
            await CreateHotKeysAsync(shape.Api.BaseAddress!);
        }

        await Wrk.RunAsync(shape.Api.BaseAddress!, "plain", "/bench/plain", Connections, TimeSpan.FromSeconds(3));
        await Wrk.RunAsync(shape.Api.BaseAddress!, "new", shape.NewKeyPath, Connections, TimeSpan.FromSeconds(3), run: "warmup", source: Path.Combine(counts, "warmup"));
    }

    for (var round = 1; round <= rounds; round++)
    {
        currentRound = round;
        // Each round starts with the next shape, so that none always follows another's PostgreSQL writes (whose
        // checkpoints and vacuums count as PostgreSQL CPU of whatever is measured next). The embedded process and
        // Orleans alone go back to back, first one then the other, since their ratios are set against each other.
        var start = (round - 1) % rotation.Length;
        foreach (var shape in rotation[start..].Concat(rotation[..start]).SelectMany(unit => round % 2 == 0 ? unit.Reverse() : unit))
        {
            // The other shapes' processes are frozen (SIGSTOP) while this one is measured: their background work
            // (collecting idle activations, garbage collection) would otherwise take the cores from this one.
            foreach (var other in shapes)
            {
                if (other == shape)
                {
                    other.Api.Resume();
                }
                else
                {
                    other.Api.Pause();
                }
            }

            var name = $"new{round}{shape.Api.Name}";
            await WarmUpAsync(shape.Api, $"warm{round}{shape.Api.Name}", shape.NewKeyPath);
            var plain = await Measure(shape, "plain", "/bench/plain", Connections, null);
            await MeasureUnlessEmpty(shape, "new keys", shape.NewKeyPath, Connections, plain, "new", run: name, source: Path.Combine(counts, name));
            if (shape.NewKeysOnly)
            {
                continue;
            }

            await MeasureUnlessEmpty(shape, "replay, hot keys", "/bench/idempotent", Connections, plain, "hot", count: HotKeys);
            await MeasureUnlessEmpty(shape, "duplicates in flight (8 per key)", "/bench/idempotent", Connections, plain, "dup", run: $"dup{round}{shape.Api.Name}");
            var plainOne = await Measure(shape, "plain", "/bench/plain", 1, null);
            await MeasureUnlessEmpty(shape, "new keys", "/bench/idempotent", 1, plainOne, "new", run: name + "c1", source: Path.Combine(counts, name + "c1"));
            if (shape.Name == "durable")
            {
                // Cold: the records are in PostgreSQL, no grain is active (the process restarted). The fresh process
                // is warmed first on other keys, cold ones included, so that the JIT is not what is measured.
                await shape.Api.StopAsync();
                shape.Api.Start();
                await WaitForHealthAsync(shape.Api);
                await WarmUpAsync(shape.Api, $"warmcold{round}");
                await Wrk.RunAsync(shape.Api.BaseAddress!, "replay", "/bench/idempotent", Connections, seconds, source: Path.Combine(counts, $"warm{round}{shape.Api.Name}"));
                await MeasureUnlessEmpty(shape, "replay, cold keys (not activated)", "/bench/idempotent", Connections, plain, "replay", source: Path.Combine(counts, name));
            }
        }
    }
}
finally
{
    foreach (var shape in shapes)
    {
        shape.Api.Resume();
        await shape.Api.KillAsync();
    }
}

Console.WriteLine();
Console.WriteLine("| shape | scenario | connections | requests/s | p50 ms | p99 ms | × plain (throughput) | API CPU µs/req | PostgreSQL CPU µs/req | errors |");
Console.WriteLine("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
foreach (var group in results.GroupBy(r => (r.Shape, r.Scenario, r.Connections)))
{
    var rows = group.ToArray();
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"| {group.Key.Shape} | {group.Key.Scenario} | {group.Key.Connections} | {Median(rows.Select(r => r.Result.RequestsPerSecond)):N0} | " +
        $"{Median(rows.Select(r => r.Result.P50Ms)):0.00} | {Median(rows.Select(r => r.Result.P99Ms)):0.00} | " +
        $"{(rows[0].Ratio > 0 ? Median(rows.Select(r => r.Ratio)).ToString("0.00", CultureInfo.InvariantCulture) : "1")} | " +
        $"{Median(rows.Select(r => r.ApiCpuUs)):0} | {Median(rows.Select(r => r.PostgresCpuUs)):0} | {rows.Sum(r => r.Result.Errors)} |"));
}

Console.WriteLine();
// Each process against its own plain in the same round, then the two ratios against each other: the machine's load
// moves a process's plain as much as its new keys, measured seconds apart.
// Paired by round: a round left out of one side leaves its pair out.
Dictionary<int, double> NewKeyRatios(string shape) =>
    results.Where(r => r.Shape == shape && r.Scenario == "new keys" && r.Connections == Connections).ToDictionary(r => r.Round, r => r.Ratio);
var aloneRatios = NewKeyRatios(orleansAlone.Name);
var ofCeiling = NewKeyRatios(embedded.Name).Where(r => aloneRatios.ContainsKey(r.Key)).OrderBy(r => r.Key).Select(r => r.Value / aloneRatios[r.Key]).ToArray();
Console.WriteLine(ofCeiling.Length == 0 ? "Embedded new keys against Orleans alone: no round measured both." : string.Create(CultureInfo.InvariantCulture,
    $"Embedded new keys reach {Median(ofCeiling):0.00}× Orleans alone's ratio to plain (rounds: {string.Join(", ", ofCeiling.Select(r => r.ToString("0.00", CultureInfo.InvariantCulture)))})."));
Console.WriteLine($"Medians of {rounds} interleaved rounds of {seconds.TotalSeconds:0} s each; ratios are per round, against plain in the same round and shape; the other shapes' processes are frozen meanwhile; each round starts with the next shape.");
if (leftOut.Count > 0)
{
    Console.WriteLine($"Left out of the medians, no request having completed: {string.Join("; ", leftOut)}.");
}

await PartsAsync();
if (args.Contains("--scale"))
{
    await ScaleAsync();
}

if (args.Contains("--memory"))
{
    await MemoryAsync();
}

// Left behind only by a run that failed, which scripts/run-dir.sh then removes.
Directory.Delete(counts, recursive: true);
Wrk.RemoveScript();
return 0;

async Task ScaleAsync()
{
    var database = await postgres.CreateDatabaseAsync();
    var api = Start("scale", new Dictionary<string, string>(durableSettings)
    {
        ["ConnectionStrings__Postgres"] = postgres.OverUnixSocket(database),
        ["Orleans__ClusterId"] = "bench-scale",
    });
    try
    {
        await WaitForHealthAsync(api);
        var shape = new Shape("durable", api);
        await Wrk.RunAsync(api.BaseAddress!, "new", "/bench/idempotent", Connections, TimeSpan.FromSeconds(2), run: "scale-warmup", source: Path.Combine(counts, "scale-warmup"));
        foreach (var records in new[] { 10_000, 1_000_000 })
        {
            await FillAsync(database, records);
            await api.StopAsync();
            api.Start();
            await WaitForHealthAsync(api);
            await WarmUpAsync(api, $"warmscale{records}");
            var one = await Measure(shape, $"new keys, {records:N0} records stored", "/bench/idempotent", 1, null, "new", run: $"scale{records}c1", source: Path.Combine(counts, $"scale{records}c1"));
            var many = await Measure(shape, $"new keys, {records:N0} records stored", "/bench/idempotent", Connections, null, "new", run: $"scale{records}", source: Path.Combine(counts, $"scale{records}"));
            await api.StopAsync();
            api.Start();
            await WaitForHealthAsync(api);
            await WarmUpAsync(api, $"warmscalecold{records}");
            var cold = await Measure(shape, $"replay, cold keys, {records:N0} records stored", "/bench/idempotent", Connections, null, "replay", source: Path.Combine(counts, $"scale{records}"));
            var coldOne = await Measure(shape, $"replay, cold keys, {records:N0} records stored", "/bench/idempotent", 1, null, "replay", source: Path.Combine(counts, $"scale{records}c1"));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"| scale | {records:N0} records: p50 at 1 connection, new key / cold replay; at 64 connections, new keys/s / cold replays/s | {one.P50Ms:0.00} ms / {coldOne.P50Ms:0.00} ms; {many.RequestsPerSecond:N0} / {cold.RequestsPerSecond:N0} | |"));
        }
    }
    finally
    {
        await api.KillAsync();
    }
}

async Task FillAsync(string database, int records)
{
    // Filler rows copy a real record under made-up keys: they are never read, they make the table and its indexes big.
    await using var connection = new Npgsql.NpgsqlConnection(database);
    await connection.OpenAsync();
    await using var command = new Npgsql.NpgsqlCommand("""
        INSERT INTO OrleansStorage (GrainIdHash, GrainTypeHash, ServiceId, GrainTypeString, GrainIdN0, GrainIdN1,
                                    GrainIdExtensionString, PayloadBinary, Version, ModifiedOn, ExpiresAt)
        SELECT hashtext(f.k), t.GrainTypeHash, t.ServiceId, t.GrainTypeString, 0, 0, f.k, t.PayloadBinary, 1, now(), t.ExpiresAt
        FROM (SELECT 'filler-' || g AS k FROM generate_series((SELECT count(*) FROM OrleansStorage) + 1, @records) g) f
        CROSS JOIN (SELECT * FROM OrleansStorage WHERE GrainIdExtensionString NOT LIKE 'filler-%' LIMIT 1) t
        """, connection) { CommandTimeout = 600 };
    command.Parameters.AddWithValue("records", (long)records);
    await command.ExecuteNonQueryAsync();
    await using var vacuum = new Npgsql.NpgsqlCommand("VACUUM ANALYZE OrleansStorage", connection) { CommandTimeout = 600 };
    await vacuum.ExecuteNonQueryAsync();
}

async Task MemoryAsync()
{
    const int Keys = 200_000;
    var api = Start("memory", new Dictionary<string, string>(durableSettings)
    {
        ["ConnectionStrings__Postgres"] = postgres.OverUnixSocket(await postgres.CreateDatabaseAsync()),
        ["Orleans__ClusterId"] = "bench-memory",
        ["Orleans__Collection__IdempotencyGrainAge"] = "00:00:30",
        ["Orleans__Collection__CollectionQuantum"] = "00:00:10",
    });
    try
    {
        await WaitForHealthAsync(api);
        await Wrk.RunAsync(api.BaseAddress!, "plain", "/bench/plain", Connections, TimeSpan.FromSeconds(2));
        // Live managed heap: dotnet-gcdump induces a full garbage collection and counts what survives it.
        var (startRss, startHeap) = (Rss(api), await LiveHeapAsync(api));
        // Each wrk thread stops after its share of the keys; wrk itself waits out the duration.
        await Wrk.RunAsync(api.BaseAddress!, "new", "/bench/idempotent", Connections, TimeSpan.FromSeconds(100), run: "memory", count: Keys / 2, source: Path.Combine(counts, "memory"));
        var (loadedRss, loaded) = (Rss(api), await HealthAsync(api));
        await Task.Delay(TimeSpan.FromSeconds(45));
        var (collectedRss, collected, collectedHeap) = (Rss(api), await HealthAsync(api), await LiveHeapAsync(api));
        // An idle process runs no garbage collection of its own: what it gives back shows after the one the heap
        // measurement induced.
        var fullyCollectedRss = Rss(api);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| memory | API process (silo): at start / after {Keys:N0} new keys ({loaded.Activations:N0} activations) / after idle activations are collected ({collected.Activations:N0} activations) / and a full garbage collection | " +
            $"live heap {startHeap / 1e6:N0} MB / — / — / {collectedHeap / 1e6:N0} MB; RSS {startRss / 1e6:N0} / {loadedRss / 1e6:N0} / {collectedRss / 1e6:N0} / {fullyCollectedRss / 1e6:N0} MB | idle age 30 s; RSS keeps what the GC reserved |"));
    }
    finally
    {
        await api.KillAsync();
    }
}

static long Rss(NodeProcess api)
{
    var line = File.ReadLines($"/proc/{api.ProcessId!.Value.ToString(CultureInfo.InvariantCulture)}/status").First(l => l.StartsWith("VmRSS:", StringComparison.Ordinal));
    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
}

static async Task<long> LiveHeapAsync(NodeProcess api)
{
    var tool = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".dotnet", "tools", "dotnet-gcdump");
    var start = new System.Diagnostics.ProcessStartInfo(tool, ["report", "-p", api.ProcessId!.Value.ToString(CultureInfo.InvariantCulture)]) { RedirectStandardOutput = true };
    using var process = System.Diagnostics.Process.Start(start)!;
    var output = await process.StandardOutput.ReadToEndAsync();
    await process.WaitForExitAsync();
    var line = output.Split('\n').First(l => l.Contains("GC Heap bytes", StringComparison.Ordinal));
    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[0], NumberStyles.AllowThousands, CultureInfo.InvariantCulture);
}

static async Task<(long Activations, long Heap)> HealthAsync(NodeProcess api)
{
    using var client = new HttpClient();
    var health = System.Text.Json.JsonDocument.Parse(await client.GetStringAsync(new Uri(api.BaseAddress!, "/health"))).RootElement;
    return (health.GetProperty("activations").GetInt64(), health.GetProperty("managedHeapBytes").GetInt64());
}

// A round in which no request completed is said, and left out of the medians rather than counted as zero.
async Task MeasureUnlessEmpty(Shape shape, string scenario, string path, int connections, WrkResult plain, string mode,
    string run = "r", int count = 0, string source = "")
{
    try
    {
        await Measure(shape, scenario, path, connections, plain, mode, run, count, source);
    }
    catch (Wrk.NoRequestsException e)
    {
        leftOut.Add($"{shape.Name}, {scenario}, c={connections}");
        Console.WriteLine($"{shape.Name,-28} {scenario,-36} c={connections,-3} left out: {e.Message}");
    }
}

async Task<WrkResult> Measure(Shape shape, string scenario, string path, int connections, WrkResult? plain, string mode = "plain",
    string run = "r", int count = 0, string source = "")
{
    // Backends that start during the run count from zero; the ones that end during it are lost (pools keep theirs).
    var (apiBefore, postgresBefore) = (ProcessCpu.Of([shape.Api.ProcessId!.Value]), ProcessCpu.Of(postgres.ProcessIds));
    var result = await Wrk.RunAsync(shape.Api.BaseAddress!, mode, path, connections, seconds, run, count, source);
    if (result.Requests == 0)
    {
        // Not a measurement: counted, its zero would pull its median down unseen (it happened once, run 30, with no
        // error counted).
        throw new Wrk.NoRequestsException($"wrk completed no request ({mode}, {connections} connections): {result.Output}");
    }

    var apiCpu = (ProcessCpu.Of([shape.Api.ProcessId!.Value]) - apiBefore).TotalMicroseconds / result.Requests;
    var postgresCpu = (ProcessCpu.Of(postgres.ProcessIds) - postgresBefore).TotalMicroseconds / result.Requests;
    var ratio = plain is null ? 0 : result.RequestsPerSecond / plain.RequestsPerSecond;
    results.Add((shape.Name, scenario, connections, result, ratio, apiCpu, postgresCpu, currentRound));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"{shape.Name,-28} {scenario,-36} c={connections,-3} {result.RequestsPerSecond,10:N0}/s p50 {result.P50Ms,7:0.00} ms p99 {result.P99Ms,7:0.00} ms " +
        $"cpu/req api {apiCpu,5:0} us pg {postgresCpu,5:0} us errors {result.Errors} {result.ErrorKinds}"));
    return result;
}

// A fresh process runs tier-0 code until the JIT has seen enough calls (measured here: about 20 s of load before
// the API's CPU per new key settles): warm it on other keys before measuring.
async Task WarmUpAsync(NodeProcess api, string run, string newKeyPath = "/bench/idempotent")
{
    await Wrk.RunAsync(api.BaseAddress!, "plain", "/bench/plain", Connections, TimeSpan.FromSeconds(3));
    await Wrk.RunAsync(api.BaseAddress!, "new", newKeyPath, Connections, TimeSpan.FromSeconds(8), run: run, source: Path.Combine(counts, run));
    // Let the garbage collection that follows a burst of new keys finish before the next measurement.
    await Task.Delay(TimeSpan.FromSeconds(3));
}

static NodeProcess Start(string name, Dictionary<string, string> settings, string? floor = null)
{
    var environment = new Dictionary<string, string>(settings)
    {
        ["Orleans__Endpoints__SiloPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
        ["Orleans__Endpoints__GatewayPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
        ["Logging__LogLevel__Default"] = "Warning",
        ["DOTNET_gcServer"] = "1",
    };
    if (floor is not null)
    {
        // The API's own runtime setting (its project file), which this benchmark's runtimeconfig does not carry.
        environment["DOTNET_ThreadPool_UnfairSemaphoreSpinLimit"] = "0";
    }

    var role = new Dictionary<string, string> { ["Orleans__Role"] = "Silo" };
    var api = floor is null
        ? NodeProcess.Api(name, environment, role)
        : NodeProcess.Web(name, typeof(FloorHost).Assembly.Location, [floor], environment, role);
    api.Start();
    return api;
}

static async Task WaitForHealthAsync(NodeProcess api)
{
    using var client = new HttpClient { Timeout = TimeSpan.FromSeconds(5) };
    for (var attempt = 0; attempt < 240; attempt++)
    {
        try
        {
            if ((await client.GetAsync(new Uri(api.BaseAddress!, "/health"))).IsSuccessStatusCode)
            {
                return;
            }
        }
        catch (Exception ex) when (ex is HttpRequestException or TaskCanceledException)
        {
            // Starting.
        }

        await Task.Delay(250);
    }

    throw new TimeoutException($"{api.Name} did not start:\n{api.Output}");
}

static async Task CreateHotKeysAsync(Uri server)
{
    using var client = new HttpClient { BaseAddress = server };
    client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "demo-alice");
    for (var i = 1; i <= HotKeys; i++)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/bench/idempotent")
        {
            Content = new StringContent("{\"amount\":5.00,\"currency\":\"EUR\"}", Encoding.UTF8, "application/json"),
        };
        request.Headers.Add("Idempotency-Key", "hot-" + i.ToString(CultureInfo.InvariantCulture));
        (await client.SendAsync(request)).EnsureSuccessStatusCode();
    }
}

static async Task PartsAsync()
{
    Console.WriteLine();
    Console.WriteLine("| part | measure | value | note |");
    Console.WriteLine("| --- | --- | ---: | --- |");
    await GrainBenchmark.RunAsync(keys: 100_000);
}

static int Option(string[] args, string name, int fallback)
{
    var index = Array.IndexOf(args, name);
    return index >= 0 && index + 1 < args.Length ? int.Parse(args[index + 1], CultureInfo.InvariantCulture) : fallback;
}

// NewKeysOnly: measured for plain and new keys at 64 connections only; NewKeyPath: where its new keys go.
internal sealed record Shape(string Name, NodeProcess Api, bool NewKeysOnly = false, string NewKeyPath = "/bench/idempotent");
