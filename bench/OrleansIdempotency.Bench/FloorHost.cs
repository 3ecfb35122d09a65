using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using OrleansIdempotency.Api;
using OrleansIdempotency.Api.Demo;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;

namespace OrleansIdempotency.Bench;

/// <summary>
/// The demo API's hosting, authentication and echo handler with Orleans' part of a new key and nothing of the layer:
/// <c>POST /bench/floor</c> activates an empty grain per <c>Idempotency-Key</c>, makes the two calls of a new key
/// around the echo and lets the activation go (<see cref="FloorGrain"/>). Its throughput against <c>/bench/plain</c>
/// in the same process is the most an embedded new key can reach while every key is a grain.
/// </summary>
public static class FloorHost
{
    /// <summary>The benchmark's argument that runs this host instead of the benchmark.</summary>
    public const string Argument = "--serve-floor";

    public const string FloorPath = "/bench/floor";

    // Prebuilt: building them is the layer's work (fingerprint, captured response), not Orleans'. Both are immutable,
    // so Orleans passes them to the co-hosted grain without copying, as it does the layer's.
    private static readonly ClaimRequest Request = new(Guid.NewGuid(), new byte[32], TimeSpan.FromMinutes(1), TimeSpan.FromHours(24));
    private static readonly StoredResponse Response = new(200, [new("Content-Type", "application/json")], new byte[33], false, 33);

    public static async Task RunAsync()
    {
        var builder = WebApplication.CreateBuilder();
        builder.AddIdempotencyCluster();
        builder.Services.AddIdempotency();
        builder.AddDemo();
        var app = builder.Build();
        // The demo API's middleware, in its order (src/Api/Program.cs); the layer's passes both endpoints through.
        app.UseExceptionHandler();
        app.UseAuthentication();
        app.UseAuthorization();
        app.UseIdempotency();
        var bench = app.MapGroup("/bench").RequireAuthorization();
        bench.MapPost("/plain", DemoEndpoints.EchoAsync);
        bench.MapPost("/floor", FloorAsync);
        app.MapClusterHealth();
        await app.RunAsync();
    }

    private static async Task FloorAsync(HttpContext context, IGrainFactory grains)
    {
        var grain = grains.GetGrain<IFloorGrain>(context.Request.Headers["Idempotency-Key"].ToString());
        var claim = await grain.ClaimAsync(Request);
        await DemoEndpoints.EchoAsync(context);
        await grain.CompleteAsync(claim.Token!.Value, Response);
    }
}
