using System.Reflection;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Mvc;
using Microsoft.AspNetCore.Mvc.ApplicationParts;
using Microsoft.AspNetCore.Mvc.Controllers;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>The surfaces that mark endpoints idempotent, as the middleware reads them: a mark missed is a layer silently off.</summary>
public sealed class EndpointMetadataTests
{
    [Fact]
    public async Task IdempotentOnAControllerClass_AndRequireIdempotencyOnAGroup_MarkEachOfTheirEndpoints_TheNearestMarkWinning()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Services.AddControllers().ConfigureApplicationPartManager(parts => parts.FeatureProviders.Add(new OnlyTransfers()));
        await using var app = builder.Build();
        app.MapControllers();
        var refunds = app.MapGroup("/refunds").RequireIdempotency("refunds");
        refunds.MapPost("/", () => Results.Ok());
        refunds.MapPost("/{id}/cancel", () => Results.Ok()).RequireIdempotency("cancellations");
        app.MapPost("/plain", () => Results.Ok());

        var marks = ((IEndpointRouteBuilder)app).DataSources.SelectMany(source => source.Endpoints).OfType<RouteEndpoint>()
            .ToDictionary(e => e.RoutePattern.RawText!.TrimStart('/'), e => e.Metadata.GetMetadata<IIdempotencyMetadata>()?.PolicyName ?? "(none)");

        Assert.Equal("transfers", marks["transfers"]);
        Assert.Equal("reversals", marks["transfers/{id}/reverse"]);
        Assert.Equal("refunds", marks["refunds/"]);
        Assert.Equal("cancellations", marks["refunds/{id}/cancel"]);
        Assert.Equal("(none)", marks["plain"]);
    }

    /// <summary>Nested, so that no other test's application finds it: only <see cref="OnlyTransfers"/> adds it.</summary>
    [ApiController]
    [Route("transfers")]
    [Idempotent(PolicyName = "transfers")]
    public sealed class TransfersController : ControllerBase
    {
        [HttpPost]
        public IActionResult Create() => Ok();

        [HttpPost("{id}/reverse")]
        [Idempotent(PolicyName = "reversals")]
        public IActionResult Reverse(string id) => Ok(id);
    }

    private sealed class OnlyTransfers : IApplicationFeatureProvider<ControllerFeature>
    {
        public void PopulateFeature(IEnumerable<ApplicationPart> parts, ControllerFeature feature) =>
            feature.Controllers.Add(typeof(TransfersController).GetTypeInfo());
    }
}
