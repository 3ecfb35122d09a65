using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using OrleansIdempotency.Bench;
using OrleansIdempotency.Testing;

// The benchmark: the demo API's /bench/plain and /bench/idempotent endpoints under wrk, in the embedded default and
// in the durable shape (PostgreSQL with fsync on, Redis), interleaved round by round; medians of the rounds.
//   dotnet run -c Release --project bench/OrleansIdempotency.Bench -- [--rounds N] [--seconds S]
var rounds = Option(args, "--rounds", 3);
var seconds = TimeSpan.FromSeconds(Option(args, "--seconds", 5));
const int Connections = 64;
const int HotKeys = 256;

Console.WriteLine($"Machine: {Environment.ProcessorCount} cores, {Math.Round(GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 1e9)} GB; .NET {Environment.Version}; wrk and the server share the cores.");
await using var postgres = await PostgresServer.StartAsync(durable: true);
await using var redis = await RedisServer.StartAsync();
var durableSettings = new Dictionary<string, string>
{
    ["ConnectionStrings__Postgres"] = await postgres.CreateDatabaseAsync(),
    ["ConnectionStrings__Redis"] = redis.ConnectionString,
    ["Orleans__ClusterId"] = "bench",
};
var shapes = new[]
{
    new Shape("embedded", Start("embedded", new Dictionary<string, string>())),
    new Shape("durable", Start("durable", durableSettings)),
};
var counts = Directory.CreateTempSubdirectory("orleans-idempotency-bench-").FullName;
var results = new List<(string Shape, string Scenario, int Connections, WrkResult Result, double Ratio, double ApiCpuUs, double PostgresCpuUs)>();
try
{
    foreach (var shape in shapes)
    {
        await WaitForHealthAsync(shape.Api);
        await CreateHotKeysAsync(shape.Api.BaseAddress!);
        await Wrk.RunAsync(shape.Api.BaseAddress!, "plain", "/bench/plain", Connections, TimeSpan.FromSeconds(3));
        await Wrk.RunAsync(shape.Api.BaseAddress!, "new", "/bench/idempotent", Connections, TimeSpan.FromSeconds(3), run: "warmup", source: Path.Combine(counts, "warmup"));
    }

    for (var round = 1; round <= rounds; round++)
    {
        foreach (var shape in shapes)
        {
            var server = shape.Api.BaseAddress!;
            var name = $"new{round}{shape.Name}";
            var plain = await Measure(shape, "plain", "/bench/plain", Connections, null);
            await Measure(shape, "new keys", "/bench/idempotent", Connections, plain, "new", run: name, source: Path.Combine(counts, name));
            await Measure(shape, "replay, hot keys", "/bench/idempotent", Connections, plain, "hot", count: HotKeys);
            await Measure(shape, "duplicates in flight (8 per key)", "/bench/idempotent", Connections, plain, "dup", run: $"dup{round}{shape.Name}");
            var plainOne = await Measure(shape, "plain", "/bench/plain", 1, null);
            await Measure(shape, "new keys", "/bench/idempotent", 1, plainOne, "new", run: name + "c1", source: Path.Combine(counts, name + "c1"));
            if (shape.Name == "durable")
            {
                // Cold: the records are in PostgreSQL, no grain is active (the process restarted).
                await shape.Api.StopAsync();
                shape.Api.Start();
                await WaitForHealthAsync(shape.Api);
                await Measure(shape, "replay, cold keys (not activated)", "/bench/idempotent", Connections, plain, "replay", source: Path.Combine(counts, name));
            }
        }
    }
}
finally
{
    foreach (var shape in shapes)
    {
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
Console.WriteLine($"Medians of {rounds} interleaved rounds of {seconds.TotalSeconds:0} s each; ratios are per round, against plain in the same round and shape.");
return 0;

async Task<WrkResult> Measure(Shape shape, string scenario, string path, int connections, WrkResult? plain, string mode = "plain",
    string run = "r", int count = 0, string source = "")
{
    // Backends that start during the run count from zero; the ones that end during it are lost (pools keep theirs).
    var (apiBefore, postgresBefore) = (ProcessCpu.Of([shape.Api.ProcessId!.Value]), ProcessCpu.Of(postgres.ProcessIds));
    var result = await Wrk.RunAsync(shape.Api.BaseAddress!, mode, path, connections, seconds, run, count, source);
    var apiCpu = (ProcessCpu.Of([shape.Api.ProcessId!.Value]) - apiBefore).TotalMicroseconds / result.Requests;
    var postgresCpu = (ProcessCpu.Of(postgres.ProcessIds) - postgresBefore).TotalMicroseconds / result.Requests;
    var ratio = plain is null ? 0 : result.RequestsPerSecond / plain.RequestsPerSecond;
    results.Add((shape.Name, scenario, connections, result, ratio, apiCpu, postgresCpu));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"{shape.Name,-9} {scenario,-36} c={connections,-3} {result.RequestsPerSecond,10:N0}/s p50 {result.P50Ms,7:0.00} ms p99 {result.P99Ms,7:0.00} ms " +
        $"cpu/req api {apiCpu,5:0} us pg {postgresCpu,5:0} us errors {result.Errors}"));
    return result;
}

static NodeProcess Start(string name, Dictionary<string, string> settings)
{
    var environment = new Dictionary<string, string>(settings)
    {
        ["Orleans__Endpoints__SiloPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
        ["Orleans__Endpoints__GatewayPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
        ["Logging__LogLevel__Default"] = "Warning",
        ["DOTNET_gcServer"] = "1",
    };
    var api = NodeProcess.Api(name, environment, new Dictionary<string, string> { ["Orleans__Role"] = "Silo" });
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

static double Median(IEnumerable<double> values)
{
    var sorted = values.Order().ToArray();
    return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[(sorted.Length / 2) - 1] + sorted[sorted.Length / 2]) / 2;
}

static int Option(string[] args, string name, int fallback)
{
    var index = Array.IndexOf(args, name);
    return index >= 0 && index + 1 < args.Length ? int.Parse(args[index + 1], CultureInfo.InvariantCulture) : fallback;
}

internal sealed record Shape(string Name, NodeProcess Api);
