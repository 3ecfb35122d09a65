using System.Globalization;
using System.Net.Http.Json;
using Npgsql;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Faults.Tests.Harness;

/// <summary>
/// The real thing on loopback: PostgreSQL, Redis, silo processes and API processes (cluster clients). Any of them
/// can be killed, stopped and started again mid-run; everything started is stopped on dispose, also when a test fails.
/// </summary>
public sealed class FaultCluster : IAsyncDisposable
{
    private FaultCluster(PostgresServer postgres, RedisServer redis, string database)
    {
        Postgres = postgres;
        Redis = redis;
        Database = database;
        Environment = new Dictionary<string, string>
        {
            ["ConnectionStrings__Postgres"] = database,
            ["ConnectionStrings__Redis"] = redis.ConnectionString,
            ["Orleans__ClusterId"] = "faults-" + Guid.NewGuid().ToString("N")[..8],
            ["Orleans__ServiceId"] = "faults",
            // Fail over in seconds: a killed silo is declared dead after about two missed one-second probes.
            ["Orleans__Membership__ProbeTimeout"] = "00:00:01",
            ["Orleans__Membership__NumMissedProbesLimit"] = "2",
            ["Orleans__Membership__NumVotesForDeathDeclaration"] = "1",
            ["Orleans__Membership__TableRefreshTimeout"] = "00:00:02",
            ["Logging__LogLevel__Default"] = "Warning",
            ["Logging__LogLevel__Orleans"] = "Error",
            ["DOTNET_TieredPGO"] = "0",
        };
    }

    public PostgresServer Postgres { get; }

    public RedisServer Redis { get; }

    /// <summary>The connection string of this cluster's database.</summary>
    public string Database { get; }

    public Dictionary<string, string> Environment { get; }

    public List<NodeProcess> Silos { get; } = [];

    public List<NodeProcess> Apis { get; } = [];

    /// <param name="clusterSettings">Settings of every process, over the harness's own (its fast failover, say).</param>
    public static async Task<FaultCluster> StartAsync(int silos, int apis, IReadOnlyDictionary<string, string>? apiSettings = null,
        IReadOnlyDictionary<string, string>? clusterSettings = null)
    {
        var postgres = await PostgresServer.StartAsync();
        RedisServer? redis = null;
        FaultCluster? cluster = null;
        try
        {
            redis = await RedisServer.StartAsync();
            cluster = new FaultCluster(postgres, redis, await postgres.CreateDatabaseAsync());
            foreach (var (key, value) in clusterSettings ?? new Dictionary<string, string>())
            {
                cluster.Environment[key] = value;
            }

            for (var i = 0; i < silos; i++)
            {
                cluster.Silos.Add(NodeProcess.Silo($"silo{i}", cluster.Environment));
            }

            for (var i = 0; i < apis; i++)
            {
                cluster.Apis.Add(NodeProcess.Api($"api{i}", cluster.Environment, apiSettings));
            }

            cluster.Silos.ForEach(s => s.Start());
            cluster.Apis.ForEach(a => a.Start());
            await cluster.WaitUntilServingAsync(silos, TimeSpan.FromSeconds(90));
            return cluster;
        }
        catch
        {
            // Whatever started is stopped: the cluster's processes and both servers, or the servers alone.
            if (cluster is not null)
            {
                await cluster.DisposeAsync();
            }
            else
            {
                if (redis is not null)
                {
                    await redis.DisposeAsync();
                }

                await postgres.DisposeAsync();
            }

            throw;
        }
    }

    /// <summary>Adds and starts one more API process.</summary>
    public async Task<NodeProcess> AddApiAsync(string name, IReadOnlyDictionary<string, string>? settings)
    {
        var api = NodeProcess.Api(name, Environment, settings);
        Apis.Add(api);
        api.Start();
        await WaitUntilServingAsync(Silos.Count(s => s.IsRunning), TimeSpan.FromSeconds(60), api);
        return api;
    }

    /// <summary>Adds and starts one more silo, and waits until every running API sees it active.</summary>
    public async Task<NodeProcess> AddSiloAsync(string name)
    {
        var silo = NodeProcess.Silo(name, Environment);
        Silos.Add(silo);
        silo.Start();
        await WaitUntilServingAsync(Silos.Count(s => s.IsRunning), TimeSpan.FromSeconds(60));
        return silo;
    }

    /// <summary>Waits until every running API answers <c>/health</c> with <paramref name="silos"/> active silos.</summary>
    public async Task WaitUntilServingAsync(int silos, TimeSpan timeout, params NodeProcess[] only)
    {
        using var client = new HttpClient { Timeout = TimeSpan.FromSeconds(5) };
        var deadline = DateTime.UtcNow + timeout;
        foreach (var api in only.Length > 0 ? only : Apis.Where(a => a.IsRunning).ToArray())
        {
            while (true)
            {
                try
                {
                    var health = await client.GetFromJsonAsync<Health>(new Uri(api.BaseAddress!, "/health"));
                    if (health?.ActiveSilos == silos)
                    {
                        break;
                    }
                }
                catch (Exception ex) when (ex is HttpRequestException or TaskCanceledException)
                {
                    // Not up yet.
                }

                if (!api.IsRunning || DateTime.UtcNow > deadline)
                {
                    // One that exited (a port it could not bind, a setting it refused) is reported at once, not waited for.
                    throw new TimeoutException($"{api.Name} {(api.IsRunning ? "did not see" : "exited before it saw")} {silos} active silos.\n{api.Output}\n{string.Join("\n", Silos.Select(s => s.Name + ":\n" + s.Output))}");
                }

                await Task.Delay(250);
            }
        }
    }

    /// <summary>
    /// Waits until each of alice's <paramref name="keys"/> has its record in the store: claimed, its action running.
    /// A fault timed by a fixed delay instead could land before a slow first request had claimed anything.
    /// </summary>
    public async Task WaitUntilClaimedAsync(IReadOnlyCollection<string> keys, TimeSpan timeout)
    {
        await using var connection = new NpgsqlConnection(Database + ";Pooling=false");
        await connection.OpenAsync();
        var ids = keys.Select(k => "10:user:alice:" + k).ToArray();
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            await using var command = new NpgsqlCommand("SELECT count(*) FROM OrleansStorage WHERE GrainIdExtensionString = ANY(@ids)", connection);
            command.Parameters.AddWithValue("ids", ids);
            var claimed = (long)(await command.ExecuteScalarAsync())!;
            if (claimed == ids.Length)
            {
                return;
            }

            if (DateTime.UtcNow > deadline)
            {
                throw new TimeoutException($"{claimed} of {ids.Length} keys were claimed within {timeout}.");
            }

            await Task.Delay(50);
        }
    }

    /// <summary>How many side effects (<paramref name="table"/> rows) each key caused.</summary>
    public async Task<Dictionary<string, long>> SideEffectsAsync(string table, string keyPrefix)
    {
        await using var connection = new NpgsqlConnection(Database + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand($"SELECT request_key, count(*) FROM {table} WHERE request_key LIKE @prefix GROUP BY request_key", connection);
        command.Parameters.AddWithValue("prefix", keyPrefix + "%");
        await using var reader = await command.ExecuteReaderAsync();
        var counts = new Dictionary<string, long>();
        while (await reader.ReadAsync())
        {
            counts[reader.GetString(0)] = reader.GetInt64(1);
        }

        return counts;
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var node in Apis.Concat(Silos))
        {
            node.Resume();
            await node.KillAsync();
        }

        await Redis.DisposeAsync();
        await Postgres.DisposeAsync();
    }

    private sealed record Health(string Status, int ActiveSilos);
}
