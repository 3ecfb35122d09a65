using Microsoft.Extensions.Logging.Abstractions;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Storage;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Silo.Tests;

/// <summary>Silos without Redis are clusters of one: two of them must not serve one service from one database.</summary>
[Collection(ServersCollection.Name)]
public sealed class StandaloneSiloLockTests(ServersFixture servers)
{
    [Fact]
    public async Task SecondLockOfAService_WaitsForTheFirst_AndRefusesWhileItIsHeld_OtherServicesAreApart()
    {
        await using var database = new IdempotencyDatabase(await servers.Postgres.CreateDatabaseAsync());
        await using var first = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await using var impatient = Lock(database, "orders", TimeSpan.FromSeconds(2));
        await using var patient = Lock(database, "orders", TimeSpan.FromSeconds(60));
        await using var otherService = Lock(database, "payments", TimeSpan.FromSeconds(2));
        await first.AcquireAsync(CancellationToken.None);

        await otherService.AcquireAsync(CancellationToken.None);
        var refused = await Assert.ThrowsAsync<InvalidOperationException>(() => impatient.AcquireAsync(CancellationToken.None));
        var waiting = patient.AcquireAsync(CancellationToken.None);
        await Task.Delay(TimeSpan.FromSeconds(1.5));
        Assert.False(waiting.IsCompleted);
        await first.ReleaseAsync();
        await waiting.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Contains("ConnectionStrings__Redis", refused.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task SecondSiloOnPostgresWithoutRedis_StartsOnlyOnceTheFirstHasStopped()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        var first = await TestSilo.StartAsync(settings);
        Task<TestSilo>? second = null;
        try
        {
            Assert.Equal(1L, await AdvisoryLocksAsync(settings));
            second = TestSilo.StartAsync(settings);
            await Task.Delay(TimeSpan.FromSeconds(3));
            Assert.False(second.IsCompleted, "A second silo without Redis started beside the first on one database.");
        }
        finally
        {
            await first.DisposeAsync();
        }

        await using var started = await second.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(IdempotencyStatus.None, (await started.Grains.GetIdempotencyGrain(new IdempotencyKey("alice", "k")).GetAsync()).Status);
        Assert.Equal(1L, await AdvisoryLocksAsync(settings));
    }

    [Fact]
    public async Task SiloWithoutRedis_StartedWhilePostgresIsDown_WaitsForIt()
    {
        var settings = await TestClusterSettings.CreateAsync(servers, redis: false);
        await servers.Postgres.StopAsync();
        Task<TestSilo> starting;
        try
        {
            starting = TestSilo.StartAsync(settings);
            await Task.Delay(TimeSpan.FromSeconds(3));
        }
        finally
        {
            await servers.Postgres.StartAgainAsync();
        }

        await using var started = await starting.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(1L, await AdvisoryLocksAsync(settings));
    }

    private static async Task<long> AdvisoryLocksAsync(Dictionary<string, string?> settings)
    {
        await using var connection = new Npgsql.NpgsqlConnection(settings["ConnectionStrings:Postgres"] + ";Pooling=false");
        await connection.OpenAsync();
        await using var command = new Npgsql.NpgsqlCommand(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", connection);
        return (long)(await command.ExecuteScalarAsync())!;
    }

    private static StandaloneSiloLock Lock(IdempotencyDatabase database, string service, TimeSpan timeout) =>
        new(database, service, TimeProvider.System, NullLogger<StandaloneSiloLock>.Instance) { StartupTimeout = timeout };
}
